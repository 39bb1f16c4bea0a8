//! The data plane: one thread per worker that relays committed streams socket to socket, metering each read.
//!
//! Once a stream is committed (its head and first content are out to the client) the rest of it is a loop of
//! "read from the upstream, meter, write to the client". In the event loop each such read costs the loop's own
//! path of a read — epoll, the transport's callback, the protocol — on top of the kernel's and the meter's work.
//! Here it costs a `recv`, the meter and a `send`, in a thread of its own that never takes the GIL: the asyncio
//! loop neither wakes for the stream's reads nor pays for them.
//!
//! The owner keeps the sockets (their transports stay open in the event loop, reading paused on the upstream
//! one) and hands this thread duplicates of their descriptors; the thread closes its duplicates when the stream
//! ends, so the owner's connection can go back to its pool. The owner also keeps the deadlines: a [`Ticket`]
//! shows the time of the last upstream read and the bytes waiting for the client, and `cancel` stops the relay at
//! once (no read is metered and no byte written after it returns).
//!
//! Locking: a stream's meter lock covers its metering, its bytes waiting for the client and every write to the
//! client; the thread holds it for one read (or one flush) at a time and never takes the GIL. `cancel` takes it
//! too, with the waiting bytes: the owner writes them, in order, before anything of its own. Whoever holds a
//! meter lock must never wait for the GIL (take it inside, not around, a section that releases the GIL). The
//! order, when both are taken: a meter lock, then the queue of finished relays.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rustc_hash::FxHashMap;

use crate::events::{Framed, StreamMeter};

pub use crate::balance::monotonic_ns;

/// A stream's meter with its upstream framing: what Python's `StreamMeter` holds, shared with the data plane.
#[derive(Debug)]
pub struct Metered {
    pub core: StreamMeter,
    /// The upstream body's framing, once known: the meter then takes wire bytes.
    pub wire: Option<Framed>,
    /// When content started, on CLOCK_MONOTONIC.
    pub first_token_ns: Option<u64>,
    /// A relay of this meter was cancelled: the data plane feeds it nothing more and writes nothing more.
    cancelled: bool,
    /// The relay ended and its `Done` is queued (with the bytes it had not written).
    finished: bool,
    /// Metered bytes the client has not taken yet (the relay's; behind this lock so that `cancel` can take them).
    outbox: Outbox,
}

impl Metered {
    pub fn new(core: StreamMeter) -> Self {
        Metered {
            core,
            wire: None,
            first_token_ns: None,
            cancelled: false,
            finished: false,
            outbox: Outbox::default(),
        }
    }

    /// Records the time once content has started.
    pub fn stamp_first_token(&mut self) {
        if self.first_token_ns.is_none() && self.core.content_started() {
            self.first_token_ns = Some(monotonic_ns());
        }
    }

    /// One upstream read (wire bytes) through the framing and the meter: `None` to send `data` as it is, else the
    /// bytes to send instead. An error before the framing is set.
    pub fn feed_wire(&mut self, data: &[u8]) -> Result<Option<Vec<u8>>, FeedError> {
        let Some(wire) = self.wire.as_mut() else {
            return Err(FeedError::Unframed);
        };
        let out = wire.feed(&mut self.core, data).map_err(FeedError::Wire)?;
        self.stamp_first_token();
        Ok(out)
    }
}

/// Why an upstream read could not be fed.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("feed_wire() before frame()")]
    Unframed,
    #[error(transparent)]
    Wire(#[from] crate::h1::H1Error),
}

pub type SharedMeter = Arc<Mutex<Metered>>;

/// The meter, locked (see [`locked`]).
pub fn lock(meter: &SharedMeter) -> MutexGuard<'_, Metered> {
    locked(meter)
}

/// A mutex of the plane, locked; a panic elsewhere while it was held leaves it usable (what each guards is only
/// ever changed by whole calls, so it is still consistent).
fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How a relayed stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The body is complete. `reusable`: the connection can carry another request (nothing came after the body
    /// and the upstream did not close it).
    Body { reusable: bool },
    /// The upstream's framing was malformed.
    Malformed(String),
    /// The upstream connection failed or closed before the body was complete.
    Broken(String),
    /// Writing to the client failed: it went away.
    ClientGone(String),
}

/// A finished relay: its ticket's id, how it ended, and the bytes it had not yet written to the client (theirs
/// to write, in order, unless the client is gone). A cancelled relay has none.
#[derive(Debug)]
pub struct Done {
    pub id: u64,
    pub end: End,
    pub rest: Vec<u8>,
}

/// The owner's view of one relay in progress.
#[derive(Debug)]
pub struct Ticket {
    pub id: u64,
    meter: SharedMeter,
    last_read_ns: AtomicU64,
    buffered: AtomicUsize,
}

impl Ticket {
    /// When the last upstream read arrived (CLOCK_MONOTONIC ns; the relay's start before any).
    pub fn last_read_ns(&self) -> u64 {
        self.last_read_ns.load(Ordering::Relaxed)
    }
    /// Bytes read from the upstream and not yet taken by the client.
    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }
}

enum Cmd {
    Add(Box<Stream>),
    Cancel(u64),
    Stop,
}

/// An eventfd: a counter one side bumps and the other reads to zero, waking an epoll on the way.
struct EventFd(OwnedFd);

impl EventFd {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
    fn bump(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64. It can only fail at the counter's maximum, still a wake-up.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
    fn reset(&self) {
        let mut n: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; EAGAIN (already zero) is fine.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }
}

struct Shared {
    wake: EventFd,
    notify: EventFd,
    cmds: Mutex<Vec<Cmd>>,
    done: Mutex<Vec<Done>>,
}

impl Shared {
    fn send(&self, cmd: Cmd) {
        let was_empty = {
            let mut cmds = locked(&self.cmds);
            let was_empty = cmds.is_empty();
            cmds.push(cmd);
            was_empty
        };
        // The thread resets the eventfd before it takes the commands: one bump per batch is enough.
        if was_empty {
            self.wake.bump();
        }
    }
}

/// The data plane thread of a worker.
pub struct Plane {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    next_id: AtomicU64,
}

const WAKE: u64 = u64::MAX;
const UP: u64 = 0;
const CLIENT: u64 = 1;
const READ_BUF: usize = 64 * 1024;
const MAX_EVENTS: usize = 256;

impl Plane {
    /// Starts the thread.
    pub fn start() -> io::Result<Plane> {
        let shared = Arc::new(Shared {
            wake: EventFd::new()?,
            notify: EventFd::new()?,
            cmds: Mutex::new(Vec::new()),
            done: Mutex::new(Vec::new()),
        });
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ep` is a fresh descriptor we own.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        ctl(
            &ep,
            libc::EPOLL_CTL_ADD,
            shared.wake.0.as_raw_fd(),
            libc::EPOLLIN as u32,
            WAKE,
        )?;
        let mut worker = Worker {
            ep,
            shared: shared.clone(),
            slots: Vec::new(),
            free: Vec::new(),
            by_id: FxHashMap::default(),
            buf: vec![0; READ_BUF],
            finished: false,
        };
        let thread = std::thread::Builder::new()
            .name("tokenrelay-plane".into())
            .spawn(move || worker.run())?;
        Ok(Plane {
            shared,
            thread: Mutex::new(Some(thread)),
            next_id: AtomicU64::new(1),
        })
    }

    /// The descriptor that becomes readable when relays have finished (then call [`Plane::completed`]).
    pub fn notify_fd(&self) -> RawFd {
        self.shared.notify.0.as_raw_fd()
    }

    /// Relays the rest of a stream: reads `upstream` through `meter` (whose framing must be set) and writes to
    /// `client`, keeping at most about `high` bytes for a client that reads slowly (the upstream is not read
    /// meanwhile). The descriptors are the thread's, closed when the relay ends. Err if the thread has stopped.
    pub fn relay(
        &self,
        meter: SharedMeter,
        upstream: OwnedFd,
        client: OwnedFd,
        high: usize,
    ) -> io::Result<Arc<Ticket>> {
        let running = locked(&self.thread)
            .as_ref()
            .is_some_and(|t| !t.is_finished());
        if !running {
            return Err(io::Error::other("the data plane thread has stopped"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ticket = Arc::new(Ticket {
            id,
            meter,
            last_read_ns: AtomicU64::new(monotonic_ns()),
            buffered: AtomicUsize::new(0),
        });
        let stream = Stream {
            ticket: ticket.clone(),
            up: upstream,
            client,
            high: high.max(1),
            reading: true,
            writing: false,
        };
        self.shared.send(Cmd::Add(Box::new(stream)));
        Ok(ticket)
    }

    /// Stops a relay: when this returns, nothing more of the stream is metered or written, and its `Done` will
    /// not come. Returns the metered bytes the relay had not written to the client (also when it had just ended
    /// and its `Done` was waiting): the caller's to write, in order, before anything else.
    pub fn cancel(&self, ticket: &Ticket) -> Vec<u8> {
        let mut meter = lock(&ticket.meter);
        meter.cancelled = true;
        if meter.finished {
            // Ended just before: its Done is taken off the queue (unless `completed` took it already).
            let mut done = locked(&self.shared.done);
            return match done.iter().position(|d| d.id == ticket.id) {
                Some(at) => done.remove(at).rest,
                None => Vec::new(),
            };
        }
        let rest = std::mem::take(&mut meter.outbox).into_rest();
        drop(meter);
        self.shared.send(Cmd::Cancel(ticket.id)); // (the thread lets go of the sockets)
        rest
    }

    /// The relays finished since the last call.
    pub fn completed(&self) -> Vec<Done> {
        self.shared.notify.reset();
        std::mem::take(&mut *locked(&self.shared.done))
    }

    /// Stops the thread (relays still in progress end as Broken, reported by `completed`) and waits for it.
    pub fn stop(&self) {
        let thread = locked(&self.thread).take();
        if let Some(thread) = thread {
            self.shared.send(Cmd::Stop);
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
impl Plane {
    /// CPU time the thread has used (to check that it sleeps when it has nothing to do).
    fn thread_cpu_ns(&self) -> u64 {
        use std::os::unix::thread::JoinHandleExt;
        let guard = self.thread.lock().unwrap();
        let thread = guard.as_ref().unwrap().as_pthread_t();
        let mut clock: libc::clockid_t = 0;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a live thread's id, valid out-pointers.
        unsafe {
            assert_eq!(libc::pthread_getcpuclockid(thread, &mut clock), 0);
            libc::clock_gettime(clock, &mut ts);
        }
        (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Stream {
    ticket: Arc<Ticket>,
    up: OwnedFd,
    client: OwnedFd,
    high: usize,
    /// The upstream is polled (not while more than `high` bytes wait for the client). While it is not, it is out
    /// of the epoll altogether: a reset would otherwise be reported (EPOLLERR/HUP cannot be masked) at every wait.
    reading: bool,
    /// The client is polled for room to write (while bytes wait for it).
    writing: bool,
}

/// Bytes for the client that it has not taken yet (from `at`).
#[derive(Debug, Default)]
struct Outbox {
    buf: Vec<u8>,
    at: usize,
}

impl Outbox {
    fn pending(&self) -> usize {
        self.buf.len() - self.at
    }

    /// Sends `data` after what is pending; keeps what the socket does not take. Err: the client is gone.
    fn send(&mut self, fd: RawFd, data: &[u8]) -> Result<(), io::Error> {
        if self.pending() > 0 {
            self.buf.extend_from_slice(data);
            return Ok(());
        }
        let sent = send_some(fd, data)?;
        if sent < data.len() {
            self.buf.clear();
            self.at = 0;
            self.buf.extend_from_slice(&data[sent..]);
        }
        Ok(())
    }

    /// Sends what is pending. Err: the client is gone.
    fn flush(&mut self, fd: RawFd) -> Result<(), io::Error> {
        let sent = send_some(fd, &self.buf[self.at..])?;
        self.at += sent;
        if self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        } else if self.at >= 64 * 1024 {
            self.buf.drain(..self.at); // (the sent front is not kept growing behind a slow client)
            self.at = 0;
        }
        Ok(())
    }

    fn into_rest(mut self) -> Vec<u8> {
        self.buf.drain(..self.at);
        self.buf
    }
}

/// Writes as much of `data` as the socket takes now.
fn send_some(fd: RawFd, data: &[u8]) -> Result<usize, io::Error> {
    let mut at = 0;
    while at < data.len() {
        // SAFETY: the pointer and length are those of a live slice; `fd` is a descriptor the stream owns.
        let n = unsafe {
            libc::send(
                fd,
                data[at..].as_ptr().cast(),
                data.len() - at,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            at += n as usize;
            continue;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => break,
            io::ErrorKind::Interrupted => continue,
            _ => return Err(err),
        }
    }
    Ok(at)
}

fn ctl(ep: &OwnedFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ep` is an epoll descriptor, `ev` a valid event for the call's duration.
    if unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct Worker {
    ep: OwnedFd,
    shared: Arc<Shared>,
    slots: Vec<Option<Box<Stream>>>,
    free: Vec<usize>,
    by_id: FxHashMap<u64, usize>,
    buf: Vec<u8>,
    /// Relays finished in this round: the owner is woken once for all of them.
    finished: bool,
}

impl Worker {
    fn run(&mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
        loop {
            // SAFETY: `events` has room for MAX_EVENTS entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.ep.as_raw_fd(),
                    events.as_mut_ptr(),
                    MAX_EVENTS as libc::c_int,
                    -1,
                )
            };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break; // (cannot happen with a valid epoll descriptor)
            }
            let mut woken = false;
            for ev in &events[..n as usize] {
                let (token, flags) = (ev.u64, ev.events);
                if token == WAKE {
                    woken = true;
                    continue;
                }
                let slot = (token >> 1) as usize;
                // A panic in one stream's metering (a bug, on some upstream's bytes) ends that stream, not the
                // thread and every other stream with it.
                let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    if token & 1 == UP {
                        self.on_upstream(slot, flags);
                    } else {
                        self.on_client(slot, flags);
                    }
                }));
                if handled.is_err() {
                    self.finish(slot, End::Broken("internal error in the data plane".into()));
                }
            }
            let go_on = !woken || self.commands();
            self.report();
            if !go_on {
                break;
            }
        }
    }

    /// Runs the queued commands; false on Stop (every relay left then ends as Broken).
    fn commands(&mut self) -> bool {
        self.shared.wake.reset();
        let cmds = std::mem::take(&mut *locked(&self.shared.cmds));
        for cmd in cmds {
            match cmd {
                Cmd::Add(stream) => self.add(stream),
                Cmd::Cancel(id) => {
                    if let Some(&slot) = self.by_id.get(&id) {
                        self.forget(slot);
                    }
                }
                Cmd::Stop => {
                    for slot in 0..self.slots.len() {
                        self.finish(slot, End::Broken("the data plane stopped".into()));
                    }
                    return false;
                }
            }
        }
        true
    }

    fn add(&mut self, stream: Box<Stream>) {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let (up, client) = (stream.up.as_raw_fd(), stream.client.as_raw_fd());
        self.by_id.insert(stream.ticket.id, slot);
        self.slots[slot] = Some(stream);
        let token = (slot as u64) << 1;
        let registered = ctl(
            &self.ep,
            libc::EPOLL_CTL_ADD,
            up,
            libc::EPOLLIN as u32,
            token | UP,
        )
        .and_then(|()| ctl(&self.ep, libc::EPOLL_CTL_ADD, client, 0, token | CLIENT));
        if let Err(e) = registered {
            self.finish(
                slot,
                End::Broken(format!("the data plane could not poll the stream: {e}")),
            );
        }
        // (A relay cancelled before it was added ends at its Cancel command, which follows.)
    }

    fn on_upstream(&mut self, slot: usize, _flags: u32) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return; // finished earlier in this round
        };
        if !s.reading {
            return; // (out of the epoll since an earlier event of this round)
        }
        // One read per readiness: the paced stream's event is one read; a busier one is read again next round.
        // SAFETY: `buf` is a live buffer of its length; `up` a descriptor the stream owns.
        let n = unsafe {
            libc::recv(
                s.up.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                return;
            }
            return self.finish(
                slot,
                End::Broken(format!("the upstream connection failed: {err}")),
            );
        }
        s.ticket
            .last_read_ns
            .store(monotonic_ns(), Ordering::Relaxed);
        let mut meter = lock(&s.ticket.meter);
        if meter.cancelled {
            drop(meter);
            self.forget(slot);
            return;
        }
        if n == 0 {
            let closed = meter.wire.as_mut().map_or(Ok(()), Framed::close);
            drop(meter);
            let end = match closed {
                Ok(()) => End::Body { reusable: false },
                Err(e) => End::Broken(e.to_string()),
            };
            return self.finish(slot, end);
        }
        let data = &self.buf[..n as usize];
        let fed = meter.feed_wire(data);
        let client = s.client.as_raw_fd();
        let sent = match &fed {
            Err(_) => Ok(()),
            Ok(None) => meter.outbox.send(client, data),
            Ok(Some(out)) => meter.outbox.send(client, out),
        };
        let wire = meter.wire.as_ref();
        let (done, excess) = (
            wire.is_some_and(Framed::done),
            wire.is_some_and(Framed::excess),
        );
        let pending = meter.outbox.pending();
        drop(meter);
        if let Err(e) = fed {
            return self.finish(slot, End::Malformed(e.to_string()));
        }
        if let Err(e) = sent {
            return self.finish(slot, End::ClientGone(e.to_string()));
        }
        if done {
            return self.finish(slot, End::Body { reusable: !excess });
        }
        self.poll(slot, pending);
    }

    fn on_client(&mut self, slot: usize, flags: u32) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        if flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
            return self.finish(
                slot,
                End::ClientGone("the client closed the connection".into()),
            );
        }
        let mut meter = lock(&s.ticket.meter);
        if meter.cancelled {
            drop(meter);
            self.forget(slot);
            return;
        }
        let flushed = match meter.outbox.pending() {
            0 => Ok(()),
            _ => meter.outbox.flush(s.client.as_raw_fd()),
        };
        let pending = meter.outbox.pending();
        drop(meter);
        match flushed {
            Ok(()) => self.poll(slot, pending),
            Err(e) => self.finish(slot, End::ClientGone(e.to_string())),
        }
    }

    /// Polls the stream's sockets for what it waits on now, `pending` bytes waiting for the client: the client
    /// for room while any wait, the upstream unless more than `high` do.
    fn poll(&mut self, slot: usize, pending: usize) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        s.ticket.buffered.store(pending, Ordering::Relaxed);
        let (writing, reading) = (pending > 0, pending <= s.high);
        let token = (slot as u64) << 1;
        let mut failed = None;
        if writing != s.writing {
            s.writing = writing;
            let events = if writing { libc::EPOLLOUT as u32 } else { 0 };
            failed = ctl(
                &self.ep,
                libc::EPOLL_CTL_MOD,
                s.client.as_raw_fd(),
                events,
                token | CLIENT,
            )
            .err();
        }
        if reading != s.reading && failed.is_none() {
            s.reading = reading;
            let op = if reading {
                libc::EPOLL_CTL_ADD
            } else {
                libc::EPOLL_CTL_DEL
            };
            failed = ctl(
                &self.ep,
                op,
                s.up.as_raw_fd(),
                libc::EPOLLIN as u32,
                token | UP,
            )
            .err();
        }
        if let Some(e) = failed {
            self.finish(
                slot,
                End::Broken(format!("the data plane could not poll the stream: {e}")),
            );
        }
    }

    /// Takes a relay off the thread: its descriptors leave the epoll and are closed (when the stream drops).
    fn forget(&mut self, slot: usize) -> Option<Box<Stream>> {
        let s = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        self.by_id.remove(&s.ticket.id);
        // Explicitly: the owner's descriptors for these sockets stay open, so closing ours would not remove them.
        let _ = ctl(&self.ep, libc::EPOLL_CTL_DEL, s.client.as_raw_fd(), 0, 0);
        if s.reading {
            let _ = ctl(&self.ep, libc::EPOLL_CTL_DEL, s.up.as_raw_fd(), 0, 0);
        }
        s.ticket.buffered.store(0, Ordering::Relaxed);
        Some(s)
    }

    /// Ends a relay and queues its `Done` for the owner, with the bytes it had not written (under its meter lock:
    /// a `cancel` either takes them or finds the Done). A relay cancelled meanwhile is only forgotten.
    fn finish(&mut self, slot: usize, end: End) {
        let Some(s) = self.forget(slot) else {
            return;
        };
        let mut meter = lock(&s.ticket.meter);
        if meter.cancelled {
            return; // the owner took the bytes and expects no Done
        }
        let rest = std::mem::take(&mut meter.outbox).into_rest();
        let rest = if matches!(end, End::ClientGone(_)) {
            Vec::new()
        } else {
            rest
        };
        meter.finished = true;
        let mut done = locked(&self.shared.done);
        self.finished |= done.is_empty();
        done.push(Done {
            id: s.ticket.id,
            end,
            rest,
        });
    }

    /// Wakes the owner once for the relays finished this round.
    fn report(&mut self) {
        if std::mem::take(&mut self.finished) {
            self.shared.notify.bump();
        }
    }
}

#[cfg(test)]
mod tests;
