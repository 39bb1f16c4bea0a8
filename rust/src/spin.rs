//! Busy polling: an idle-priority thread that keeps a worker's core awake while the worker has clients.
//!
//! A request that arrives on a core that was idle pays for the idle: the core's sleep state, and on a VM the
//! hypervisor handing the physical core to someone else, leave the caches and branch predictors cold, and the
//! few hundred microseconds of Python that open a stream run several times slower than on a warm core
//! (benches/README.md, "Busy polling"). A thread that spins on the worker's core never lets it go idle; as a
//! `SCHED_IDLE` thread it runs only when nothing else on that core wants to, and any other thread that wakes
//! there preempts it at once. It spins while [`Spinner::enter`] calls outnumber [`Spinner::leave`] calls (the
//! worker's open client connections) and for a linger after the last leave (an SDK closes its connection after
//! each stream, and opens the next one a tool call later), and sleeps on a condition variable otherwise.
//!
//! The price is a core at 100 % for as long as clients are connected: `busy_poll` is off by default.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::plane::monotonic_ns;

/// How many spin hints between two looks at the count (~µs: a leave is noticed within that).
const SPINS_PER_CHECK: u32 = 256;

#[derive(Debug, Default)]
struct Shared {
    clients: AtomicUsize,
    /// When `leave` was last called (CLOCK_MONOTONIC ns), and how long to spin on after it.
    left_ns: AtomicU64,
    linger_ns: u64,
    /// The thread is spinning (else asleep, or not yet started).
    spinning: AtomicBool,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

/// The spinning thread and the count of what keeps it spinning.
#[derive(Debug)]
pub struct Spinner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The thread's CPU-time clock (`pthread_getcpuclockid`), to report what the spinning cost.
    clock: libc::clockid_t,
}

impl Spinner {
    /// Starts the thread, pinned to `cpu` if given, as `SCHED_IDLE`. An error if the thread cannot be made
    /// idle-priority or pinned: spinning at normal priority would take half the core from the worker.
    pub fn start(cpu: Option<usize>, linger: Duration) -> io::Result<Spinner> {
        let shared = Arc::new(Shared {
            linger_ns: u64::try_from(linger.as_nanos()).unwrap_or(u64::MAX),
            ..Shared::default()
        });
        let (ready, started) = mpsc::channel::<io::Result<libc::clockid_t>>();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("tokenrelay-spin".into())
            .spawn(move || {
                let setup = prepare(cpu);
                let ok = setup.is_ok();
                let _ = ready.send(setup);
                if ok {
                    run(&thread_shared);
                }
            })?;
        match started.recv() {
            Ok(Ok(clock)) => Ok(Spinner {
                shared,
                thread: Mutex::new(Some(thread)),
                clock,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other(
                    "the spinner thread ended before it started",
                ))
            }
        }
    }

    /// One more reason to spin (a client connection opened).
    pub fn enter(&self) {
        if self.shared.clients.fetch_add(1, Ordering::AcqRel) == 0 {
            let _guard = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_one();
        }
    }

    /// One reason fewer (a client connection closed); spinning stops when none is left. Extra calls are
    /// ignored (the count does not go below zero).
    pub fn leave(&self) {
        // (stamped first: the thread that sees the count at zero sees this leave's time with it)
        self.shared.left_ns.store(monotonic_ns(), Ordering::Release);
        let _ = self
            .shared
            .clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Whether the thread is spinning now (as of its last look at the count).
    pub fn spinning(&self) -> bool {
        self.shared.spinning.load(Ordering::Acquire)
    }

    /// The reasons to spin now.
    pub fn clients(&self) -> usize {
        self.shared.clients.load(Ordering::Acquire)
    }

    /// The CPU time the thread has used, in ns (what busy polling cost so far).
    pub fn cpu_ns(&self) -> u64 {
        if self.shared.stop.load(Ordering::Acquire) {
            return 0;
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `clock` is the live thread's CPU clock (the thread runs until `stop`); `ts` is valid to write.
        let rc = unsafe { libc::clock_gettime(self.clock, &mut ts) };
        if rc != 0 {
            return 0;
        }
        (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// Stops the thread and waits for it.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_one();
        }
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// In the new thread: pinned and made idle-priority; its CPU clock.
fn prepare(cpu: Option<usize>) -> io::Result<libc::clockid_t> {
    if let Some(cpu) = cpu {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no such CPU"));
        }
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays within it (checked above); 0 is this thread.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: 0 is this thread; `param` is valid to read.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sched_getscheduler(0) only reads this thread's policy.
    if unsafe { libc::sched_getscheduler(0) } != libc::SCHED_IDLE {
        return Err(io::Error::other("SCHED_IDLE was not applied"));
    }
    let mut clock: libc::clockid_t = 0;
    // SAFETY: pthread_self() is this live thread; `clock` is valid to write.
    let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(clock)
}

fn run(shared: &Shared) {
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        if shared.clients.load(Ordering::Acquire) == 0
            && monotonic_ns().saturating_sub(shared.left_ns.load(Ordering::Acquire))
                >= shared.linger_ns
        {
            shared.spinning.store(false, Ordering::Release);
            let mut guard = shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            while shared.clients.load(Ordering::Acquire) == 0
                && !shared.stop.load(Ordering::Acquire)
            {
                guard = shared.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
            shared.spinning.store(true, Ordering::Release);
            continue;
        }
        for _ in 0..SPINS_PER_CHECK {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// The tests look their thread up by name: one spinner at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    /// The thread's CPU time over `span` of wall time, in ns.
    fn cpu_over(spinner: &Spinner, span: Duration) -> u64 {
        let before = spinner.cpu_ns();
        std::thread::sleep(span);
        spinner.cpu_ns() - before
    }

    #[test]
    fn spins_only_while_entered() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let spinner = Spinner::start(None, Duration::from_millis(300)).unwrap();
        // Asleep: a few µs at most (the start).
        assert!(cpu_over(&spinner, Duration::from_millis(100)) < 10_000_000);
        assert!(!spinner.spinning());
        spinner.enter();
        spinner.enter();
        spinner.leave();
        assert_eq!(spinner.clients(), 1);
        // Spinning: it runs whenever its core has nothing else (on a busy test machine, well under 100 %).
        let busy = cpu_over(&spinner, Duration::from_millis(300));
        assert!(busy > 30_000_000, "spun only {busy} ns in 300 ms");
        spinner.leave();
        spinner.leave(); // (one too many: ignored)
        assert_eq!(spinner.clients(), 0);
        // It lingers 300 ms after the last leave, then sleeps (a thread of the lowest priority: on a busy test
        // machine it may take a while to run and see that).
        std::thread::sleep(Duration::from_millis(150));
        assert!(spinner.spinning());
        let deadline = Instant::now() + Duration::from_secs(5);
        while spinner.spinning() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!spinner.spinning());
        assert!(cpu_over(&spinner, Duration::from_millis(200)) < 10_000_000);
        let start = Instant::now();
        spinner.stop();
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(spinner.cpu_ns(), 0);
    }

    #[test]
    fn the_thread_is_idle_priority_and_pinned() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: sched_getcpu only reads the calling thread's CPU.
        let cpu = unsafe { libc::sched_getcpu() };
        let spinner = Spinner::start(Some(cpu as usize), Duration::ZERO).unwrap();
        let tid = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| {
                std::fs::read_to_string(e.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "tokenrelay-spin")
            })
            .map(|e| e.file_name().to_string_lossy().parse::<i32>().unwrap())
            .unwrap();
        // SAFETY: reading another thread's policy and affinity; `set` is valid to write.
        let (policy, on_cpu, count) = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
            (
                libc::sched_getscheduler(tid),
                libc::CPU_ISSET(cpu as usize, &set),
                libc::CPU_COUNT(&set),
            )
        };
        assert_eq!(policy, libc::SCHED_IDLE);
        assert!(on_cpu && count == 1);
        drop(spinner);
        assert!(Spinner::start(Some(libc::CPU_SETSIZE as usize), Duration::ZERO).is_err());
    }
}
