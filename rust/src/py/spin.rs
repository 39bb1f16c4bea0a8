//! Python glue for busy polling: `Spinner` (see `rust/src/spin.rs`).

use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::spin::Spinner;

/// An idle-priority thread that keeps its core awake while `enter()` calls outnumber `leave()` calls, and for
/// `linger_s` after the last `leave()`.
#[pyclass(frozen, module = "tokenrelay._core", name = "Spinner")]
pub struct PySpinner {
    spinner: Spinner,
}

#[pymethods]
impl PySpinner {
    /// Starts the thread (pinned to `cpu` if given, `SCHED_IDLE`), spinning on for `linger_s` after the last
    /// `leave()`; `OSError` if it cannot be made so.
    #[new]
    #[pyo3(signature = (cpu=None, linger_s=0.0))]
    fn new(py: Python<'_>, cpu: Option<usize>, linger_s: f64) -> PyResult<Self> {
        let linger = Duration::try_from_secs_f64(linger_s).map_err(|_| {
            PyValueError::new_err("linger_s must be a non-negative number of seconds")
        })?;
        let spinner = py
            .detach(|| Spinner::start(cpu, linger))
            .map_err(|e| PyOSError::new_err(format!("cannot start the busy-poll thread: {e}")))?;
        Ok(PySpinner { spinner })
    }

    /// One more reason to spin (a client connection opened).
    fn enter(&self) {
        self.spinner.enter();
    }

    /// One reason fewer; spinning stops when none is left.
    fn leave(&self) {
        self.spinner.leave();
    }

    /// The reasons to spin now.
    #[getter]
    fn clients(&self) -> usize {
        self.spinner.clients()
    }

    /// The CPU seconds the thread has used (what busy polling cost).
    #[getter]
    fn cpu_seconds(&self) -> f64 {
        self.spinner.cpu_ns() as f64 / 1e9
    }

    /// Stops the thread and waits for it.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.spinner.stop());
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySpinner>()
}
