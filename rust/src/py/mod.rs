//! The Python glue: `tokenrelay._core`. Each submodule registers its own classes; nothing here holds logic.

use pyo3::prelude::*;

mod balance;
mod body;
mod h1;
mod meter;
mod plane;
mod spin;
mod stream;
mod tokens;
mod translate;

/// Below this many bytes of work, a call keeps the GIL. Releasing it for microseconds of work lets a thread
/// waiting for it (the ledger's writer) in, and taking it back can then wait up to the interpreter's switch
/// interval (5 ms): a stall of the whole event loop for nothing. ~0.2 ms of token counting.
pub(crate) const DETACH_BYTES: usize = 32 * 1024;

/// Runs `f` with the GIL released only when `work_bytes` is worth it (see [`DETACH_BYTES`]).
pub(crate) fn detach_if<T: Send>(
    py: Python<'_>,
    work_bytes: usize,
    f: impl FnOnce() -> T + Send,
) -> T {
    if work_bytes >= DETACH_BYTES {
        py.detach(f)
    } else {
        f()
    }
}

/// The extension module. Errors cross as Python exceptions; a Rust panic surfaces as `PanicException`.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    stream::register(m)?;
    tokens::register(m)?;
    balance::register(m)?;
    meter::register(m)?;
    translate::register(m)?;
    h1::register(m)?;
    spin::register(m)?;
    plane::register(m)?;
    body::register(m)?;
    Ok(())
}
