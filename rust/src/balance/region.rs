//! Where a pool's deployment states live: in this process's memory, or in a file mapped by every worker of one
//! daemon (`--workers N`), so that a deployment's `max_concurrent`, rpm/tpm, breaker and cooldown hold for the
//! daemon and not for each worker.
//!
//! The states are plain data (`#[repr(C)]`, fixed size) behind a process-shared, robust pthread mutex each: a
//! worker that dies holding one (killed between two instructions of a few-nanosecond critical section) leaves
//! it to the next locker with `EOWNERDEAD`, which marks it consistent and goes on. What a worker holds (its
//! requests in flight, a circuit probe) is kept in its own row, by worker index, and dropped when a worker of
//! that index attaches again: a restarted worker's predecessor took its requests with it.
//!
//! The file: a header (magic, layout version, deployment count, state size, a fingerprint of the pool's
//! configuration, the clock epoch all workers share), then one `State` per deployment. The first worker to
//! open it (under `flock`) builds it; the others check that the header describes the same pool and attach.

use std::cell::UnsafeCell;
use std::ffi::CString;
use std::io;
use std::mem::{align_of, size_of};
use std::ops::{Deref, DerefMut};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use super::deployment::{AtomicF64, Inner};

/// Most workers whose rows a state keeps (a worker index is taken modulo this).
pub const MAX_WORKERS: usize = 32;
const MAGIC: u64 = u64::from_le_bytes(*b"trpool\0\x01");
const VERSION: u32 = 2;
/// The states start at this offset of the file (a cache line past the header).
const STATES_AT: usize = 64;

/// The time on CLOCK_MONOTONIC in ns (the clock of Python's `time.monotonic_ns()`; one clock for every process).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: u32,
    count: u32,
    state_size: u64,
    fingerprint: u64,
    epoch_ns: u64,
    /// Bit `w`: worker `w` has requests waiting for room on this pool (so a release elsewhere should wake it).
    waiting: AtomicU32,
}

/// One deployment's state: the figures `pick()` scans without a lock, and the rest behind the lock.
#[repr(C, align(64))]
pub(crate) struct State {
    mutex: UnsafeCell<libc::pthread_mutex_t>,
    pub(crate) outstanding: AtomicU32,
    /// Unavailable before this time (cooldown, open circuit, probe in flight; infinite while down).
    pub(crate) avail_at: AtomicF64,
    /// Full on rpm/tpm before this time.
    pub(crate) busy_until: AtomicF64,
    /// Moving averages; NaN until the first sample.
    pub(crate) ewma_ttft: AtomicF64,
    pub(crate) ewma_tps: AtomicF64,
    inner: UnsafeCell<Inner>,
}

// SAFETY: `inner` is only reached through `lock()`, which holds the (process-shared) mutex; the rest are atomics.
unsafe impl Sync for State {}
// SAFETY: as above; nothing in a state is tied to the thread that made it.
unsafe impl Send for State {}

/// The locked part of a state; unlocks when dropped.
pub(crate) struct Guard<'a>(&'a State);

impl Deref for Guard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        // SAFETY: the guard holds the state's mutex.
        unsafe { &*self.0.inner.get() }
    }
}

impl DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        // SAFETY: the guard holds the state's mutex, so this is the only reference.
        unsafe { &mut *self.0.inner.get() }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        // SAFETY: this thread locked the mutex in `State::lock`.
        unsafe { libc::pthread_mutex_unlock(self.0.mutex.get()) };
    }
}

impl State {
    /// Builds a state in place at `at` (zeroed or stale memory that no one else uses yet).
    ///
    /// # Safety
    /// `at` must be valid for writes of a `State`, aligned, and not in use by anyone until this returns.
    unsafe fn init(at: *mut State, inner: Inner) -> io::Result<()> {
        let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
        let mut rc = libc::pthread_mutexattr_init(&mut attr);
        if rc == 0 {
            rc = libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
        }
        if rc == 0 {
            rc = libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
        }
        if rc == 0 {
            rc = libc::pthread_mutex_init(ptr::addr_of_mut!((*at).mutex).cast(), &attr);
        }
        libc::pthread_mutexattr_destroy(&mut attr);
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        ptr::addr_of_mut!((*at).outstanding).write(AtomicU32::new(0));
        ptr::addr_of_mut!((*at).avail_at).write(AtomicF64::new(f64::NEG_INFINITY));
        ptr::addr_of_mut!((*at).busy_until).write(AtomicF64::new(f64::NEG_INFINITY));
        ptr::addr_of_mut!((*at).ewma_ttft).write(AtomicF64::new(f64::NAN));
        ptr::addr_of_mut!((*at).ewma_tps).write(AtomicF64::new(f64::NAN));
        ptr::addr_of_mut!((*at).inner).write(UnsafeCell::new(inner));
        Ok(())
    }

    /// Locks the state. A lock whose holder died is taken over as it is (see the module doc).
    pub(crate) fn lock(&self) -> Guard<'_> {
        // SAFETY: the mutex was initialized by `init` and lives as long as `self`.
        let rc = unsafe { libc::pthread_mutex_lock(self.mutex.get()) };
        if rc == libc::EOWNERDEAD {
            // SAFETY: this thread now holds the mutex; marking it consistent keeps it usable after the unlock.
            unsafe { libc::pthread_mutex_consistent(self.mutex.get()) };
        }
        // Any other error (EINVAL, EDEADLK) means the mapping is not what `attach` checked: not recoverable here.
        debug_assert!(
            rc == 0 || rc == libc::EOWNERDEAD,
            "pthread_mutex_lock: {rc}"
        );
        Guard(self)
    }
}

enum Memory {
    Heap(std::alloc::Layout),
    Mapped(usize),
}

/// The states of one pool: `count` `State`s, owned (heap) or mapped (shared by the workers).
pub(crate) struct Region {
    base: NonNull<u8>,
    memory: Memory,
    count: usize,
    epoch_ns: u64,
    worker: usize,
}

// SAFETY: the region owns its memory; the states in it are `Sync`.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("count", &self.count)
            .field("shared", &matches!(self.memory, Memory::Mapped(_)))
            .field("worker", &self.worker)
            .finish()
    }
}

fn layout_len(count: usize) -> usize {
    STATES_AT + count * size_of::<State>()
}

impl Region {
    /// States in this process's memory, built from `inner(i)`.
    pub(crate) fn private(count: usize, inner: impl Fn(usize) -> Inner) -> io::Result<Region> {
        let layout = std::alloc::Layout::from_size_align(
            count.max(1) * size_of::<State>(),
            align_of::<State>(),
        )
        .map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: the layout has a non-zero size.
        let base = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let region = Region {
            base,
            memory: Memory::Heap(layout),
            count: 0,
            epoch_ns: monotonic_ns(),
            worker: 0,
        };
        region.build(count, inner)
    }

    /// The states in the file at `path`, shared with every process that attaches to it with the same
    /// `fingerprint`, as worker `worker`: built by the first, checked by the others.
    pub(crate) fn shared(
        path: &Path,
        count: usize,
        fingerprint: u64,
        worker: usize,
        inner: impl Fn(usize) -> Inner,
    ) -> io::Result<Region> {
        let name = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
        // SAFETY: plain syscalls on a descriptor this function owns and closes.
        unsafe {
            let fd = libc::open(
                name.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
                0o600,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let result = Self::map_locked(fd, count, fingerprint, worker, inner);
            // Unlocked by hand: the mapping keeps the open file (and a lock on it) alive past the close.
            libc::flock(fd, libc::LOCK_UN);
            libc::close(fd);
            result
        }
    }

    unsafe fn map_locked(
        fd: i32,
        count: usize,
        fingerprint: u64,
        worker: usize,
        inner: impl Fn(usize) -> Inner,
    ) -> io::Result<Region> {
        if libc::flock(fd, libc::LOCK_EX) != 0 {
            return Err(io::Error::last_os_error());
        }
        let len = layout_len(count);
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        let size = st.st_size as usize;
        if size != 0 && size != len {
            return Err(mismatch("its size"));
        }
        if size == 0 && libc::ftruncate(fd, len as libc::off_t) != 0 {
            return Err(io::Error::last_os_error());
        }
        let addr = libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new_unchecked(addr.cast::<u8>());
        let header = &*base.as_ptr().cast::<Header>();
        let mut region = Region {
            base,
            memory: Memory::Mapped(len),
            count: 0,
            epoch_ns: 0,
            worker: worker % MAX_WORKERS,
        };
        if header.magic.load(Relaxed) != MAGIC {
            // New (or left half-built by a process that died holding the flock): build it.
            let epoch_ns = monotonic_ns();
            let head = base.as_ptr().cast::<Header>();
            ptr::addr_of_mut!((*head).version).write(VERSION);
            ptr::addr_of_mut!((*head).count).write(count as u32);
            ptr::addr_of_mut!((*head).state_size).write(size_of::<State>() as u64);
            ptr::addr_of_mut!((*head).fingerprint).write(fingerprint);
            ptr::addr_of_mut!((*head).epoch_ns).write(epoch_ns);
            ptr::addr_of_mut!((*head).waiting).write(AtomicU32::new(0));
            region.epoch_ns = epoch_ns;
            let region = region.build(count, inner)?;
            header.magic.store(MAGIC, Relaxed);
            return Ok(region);
        }
        if header.version != VERSION || header.state_size != size_of::<State>() as u64 {
            return Err(mismatch("its layout (another build of tokenrelay)"));
        }
        if header.count as usize != count || header.fingerprint != fingerprint {
            return Err(mismatch("its deployments (another configuration)"));
        }
        region.epoch_ns = header.epoch_ns;
        region.count = count;
        region.set_waiting(false); // (a predecessor of this index may have died waiting)
        Ok(region)
    }

    fn build(mut self, count: usize, inner: impl Fn(usize) -> Inner) -> io::Result<Region> {
        for i in 0..count {
            // SAFETY: `i < count` states fit in the memory, aligned; no one uses them before this returns.
            unsafe { State::init(self.state_ptr(i), inner(i))? };
            self.count = i + 1;
        }
        Ok(self)
    }

    fn state_ptr(&self, i: usize) -> *mut State {
        let at = match self.memory {
            Memory::Heap(_) => 0,
            Memory::Mapped(_) => STATES_AT,
        };
        // SAFETY (for the callers): in bounds for `i < count` by the layouts above.
        unsafe { self.base.as_ptr().add(at).cast::<State>().add(i) }
    }

    /// The states.
    pub(crate) fn states(&self) -> &[State] {
        // SAFETY: `count` states were built (or checked) at `state_ptr(0)`, and live as long as `self`.
        unsafe { std::slice::from_raw_parts(self.state_ptr(0), self.count) }
    }

    /// Whether other processes may share these states.
    pub(crate) fn is_shared(&self) -> bool {
        matches!(self.memory, Memory::Mapped(_))
    }

    /// CLOCK_MONOTONIC at the pool's time 0 (the same for every worker of a shared pool).
    pub(crate) fn epoch_ns(&self) -> u64 {
        self.epoch_ns
    }

    /// This process's row in each state.
    pub(crate) fn worker(&self) -> usize {
        self.worker
    }

    fn header(&self) -> Option<&Header> {
        match self.memory {
            Memory::Heap(_) => None,
            // SAFETY: a mapped region starts with its header, checked or built in `map_locked`.
            Memory::Mapped(_) => Some(unsafe { &*self.base.as_ptr().cast::<Header>() }),
        }
    }

    /// Marks whether this worker has requests waiting for room (a no-op unless shared).
    pub(crate) fn set_waiting(&self, waiting: bool) {
        if let Some(h) = self.header() {
            let bit = 1u32 << self.worker;
            if waiting {
                h.waiting.fetch_or(bit, Relaxed);
            } else {
                h.waiting.fetch_and(!bit, Relaxed);
            }
        }
    }

    /// The other workers with requests waiting for room, as a bit set by worker index (0 unless shared).
    pub(crate) fn others_waiting(&self) -> u32 {
        self.header()
            .map_or(0, |h| h.waiting.load(Relaxed) & !(1u32 << self.worker))
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        match self.memory {
            Memory::Heap(layout) => {
                for s in self.states() {
                    // SAFETY: no guard outlives the region (guards borrow it).
                    unsafe { libc::pthread_mutex_destroy(s.mutex.get()) };
                }
                // SAFETY: allocated in `private` with this layout.
                unsafe { std::alloc::dealloc(self.base.as_ptr(), layout) };
            }
            // SAFETY: mapped in `map_locked` with this length; the states stay for the other workers.
            Memory::Mapped(len) => unsafe {
                libc::munmap(self.base.as_ptr().cast(), len);
            },
        }
    }
}

fn mismatch(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the workers' shared pool file differs in {what}"),
    )
}

/// FNV-1a, for the configuration fingerprint: the same in every process (unlike std's hasher).
pub(crate) fn fnv1a(bytes: impl IntoIterator<Item = u8>, mut hash: u64) -> u64 {
    for b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// FNV-1a's offset basis.
pub(crate) const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;
