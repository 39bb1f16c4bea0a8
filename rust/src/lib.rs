//! tokenrelay's core: the hot paths of the proxy, in plain Rust.
//!
//! The modules below hold no pyo3 types and are tested with `cargo test` alone; `py/` is the thin glue that
//! exposes them to Python as `tokenrelay._core` (built with the `python` feature by maturin).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod api;
pub mod balance;
pub mod body;
pub mod events;
pub mod h1;
pub mod meter;
pub mod plane;
pub mod spin;
pub mod sse;
pub mod tokens;
pub mod translate;

#[cfg(feature = "python")]
mod py;
