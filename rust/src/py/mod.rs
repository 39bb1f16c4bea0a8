//! The Python glue: `tokenrelay._core`. Each submodule registers its own classes; nothing here holds logic.

use pyo3::prelude::*;

mod balance;
mod h1;
mod meter;
mod stream;
mod tokens;
mod translate;

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
    Ok(())
}
