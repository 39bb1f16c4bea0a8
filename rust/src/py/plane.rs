//! Python glue for the data plane: `Plane`, `Relay` (a ticket) and the `RELAY_*` kinds of `Plane.completed()`.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::stream::PyStreamMeter;
use crate::plane::{self, End, Plane, Ticket};

/// The body is complete (`arg`: whether the connection can carry another request).
const RELAY_END: u8 = 0;
/// The upstream's framing was malformed (`arg`: the message).
const RELAY_MALFORMED: u8 = 1;
/// The client went away (`arg`: the message).
const RELAY_CLIENT_GONE: u8 = 2;
/// The upstream connection failed or closed before the body's end (`arg`: the message).
const RELAY_BROKEN: u8 = 3;

/// A duplicate of `fd`, close-on-exec, for the plane to own.
fn dup(fd: i32) -> PyResult<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor or -1; a bad `fd` is an error, not UB.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(PyOSError::new_err(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    // SAFETY: `new` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// The worker's data plane thread: relays committed streams from an upstream socket to a client socket,
/// metering each read, without the event loop or the GIL (see `rust/src/plane.rs`).
#[pyclass(frozen, module = "tokenrelay._core", name = "Plane")]
pub struct PyPlane {
    plane: Arc<Plane>,
}

#[pymethods]
impl PyPlane {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(PyPlane {
            plane: Arc::new(Plane::start().map_err(|e| PyOSError::new_err(e.to_string()))?),
        })
    }

    /// The descriptor that becomes readable when relays finished: then call `completed()`.
    fn fileno(&self) -> i32 {
        self.plane.notify_fd()
    }

    /// Relays the rest of a stream from the socket `upstream_fd` through `meter` (framed: `frame()` was called)
    /// to the socket `client_fd`, holding at most about `high` bytes for a slow client. Both descriptors are
    /// duplicated (the caller's stay open and theirs); the caller must not read the upstream or write the client
    /// until the relay's kind comes from `completed()`.
    fn relay(
        &self,
        meter: &Bound<'_, PyStreamMeter>,
        upstream_fd: i32,
        client_fd: i32,
        high: usize,
    ) -> PyResult<PyRelay> {
        let inner = meter.get().inner.clone();
        if plane::lock(&inner).wire.is_none() {
            return Err(PyValueError::new_err("relay() of a meter before frame()"));
        }
        let (up, client) = (dup(upstream_fd)?, dup(client_fd)?);
        let ticket = self
            .plane
            .relay(inner, up, client, high)
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        Ok(PyRelay {
            ticket,
            plane: self.plane.clone(),
        })
    }

    /// The relays that finished since the last call: `(id, kind, arg, rest)` each, `rest` being the bytes the
    /// relay had not yet written to the client (the caller's to write, in order).
    #[allow(clippy::type_complexity)]
    fn completed<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Vec<(u64, u8, Py<PyAny>, Bound<'py, PyBytes>)>> {
        let mut out = Vec::new();
        for done in self.plane.completed() {
            let (kind, arg) = match done.end {
                End::Body { reusable } => (
                    RELAY_END,
                    pyo3::types::PyBool::new(py, reusable)
                        .to_owned()
                        .into_any()
                        .unbind(),
                ),
                End::Malformed(m) => (RELAY_MALFORMED, m.into_pyobject(py)?.into_any().unbind()),
                End::ClientGone(m) => (RELAY_CLIENT_GONE, m.into_pyobject(py)?.into_any().unbind()),
                End::Broken(m) => (RELAY_BROKEN, m.into_pyobject(py)?.into_any().unbind()),
            };
            out.push((done.id, kind, arg, PyBytes::new(py, &done.rest)));
        }
        Ok(out)
    }

    /// Stops the thread; relays still in progress end as RELAY_BROKEN (in the next `completed()`).
    fn close(&self, py: Python<'_>) {
        let plane = self.plane.clone();
        py.detach(move || plane.stop());
    }
}

/// One relay in progress: the owner's clocks on it, and `cancel()`.
#[pyclass(frozen, module = "tokenrelay._core", name = "Relay")]
pub struct PyRelay {
    ticket: Arc<Ticket>,
    plane: Arc<Plane>,
}

#[pymethods]
impl PyRelay {
    #[getter]
    fn id(&self) -> u64 {
        self.ticket.id
    }

    /// When the last upstream read arrived, in `time.monotonic()` seconds (the relay's start before any).
    #[getter]
    fn last_read(&self) -> f64 {
        self.ticket.last_read_ns() as f64 / 1e9
    }

    /// Bytes read from the upstream that the client has not taken yet.
    #[getter]
    fn buffered(&self) -> usize {
        self.ticket.buffered()
    }

    /// Stops the relay: once this returns nothing more is metered or written to the client, and it will not be
    /// in `completed()`. Returns the metered bytes it had not written: the caller's to write, before anything
    /// else.
    fn cancel<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.plane.cancel(&self.ticket))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPlane>()?;
    m.add_class::<PyRelay>()?;
    m.add("RELAY_END", RELAY_END)?;
    m.add("RELAY_MALFORMED", RELAY_MALFORMED)?;
    m.add("RELAY_CLIENT_GONE", RELAY_CLIENT_GONE)?;
    m.add("RELAY_BROKEN", RELAY_BROKEN)?;
    Ok(())
}
