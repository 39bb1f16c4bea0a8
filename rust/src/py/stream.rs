//! Python glue for the stream meter: `Usage`, `StreamMeter`, `decode_body`. No logic lives here.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::api::Api;
use crate::events::{self, StreamMeter, Usage};

fn parse_api(name: &str, allow_embeddings: bool) -> PyResult<Api> {
    match Api::from_name(name) {
        Some(Api::Embeddings) if !allow_embeddings => Err(PyValueError::new_err(
            "embeddings are never streamed: use decode_body()",
        )),
        Some(api) => Ok(api),
        None => Err(PyValueError::new_err(format!(
            "unknown api {name:?}: expected \"chat\", \"completions\", \"responses\" or \"messages\""
        ))),
    }
}

/// The normalised usage of one request (frozen).
#[pyclass(frozen, eq, module = "tokenrelay._core", name = "Usage")]
#[derive(PartialEq)]
pub struct PyUsage(Usage);

#[pymethods]
impl PyUsage {
    #[getter]
    fn input(&self) -> u64 {
        self.0.input
    }
    #[getter]
    fn output(&self) -> u64 {
        self.0.output
    }
    #[getter]
    fn cached_input(&self) -> u64 {
        self.0.cached_input
    }
    #[getter]
    fn cache_write(&self) -> u64 {
        self.0.cache_write
    }
    #[getter]
    fn reasoning(&self) -> u64 {
        self.0.reasoning
    }
    #[getter]
    fn input_source(&self) -> &'static str {
        self.0.input_source.name()
    }
    #[getter]
    fn output_source(&self) -> &'static str {
        self.0.output_source.name()
    }
    #[getter]
    fn cached_input_source(&self) -> &'static str {
        self.0.cached_input_source.name()
    }
    #[getter]
    fn cache_write_source(&self) -> &'static str {
        self.0.cache_write_source.name()
    }
    #[getter]
    fn reasoning_source(&self) -> &'static str {
        self.0.reasoning_source.name()
    }

    /// All ten fields as a dict.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let u = &self.0;
        let d = PyDict::new(py);
        d.set_item("input", u.input)?;
        d.set_item("output", u.output)?;
        d.set_item("cached_input", u.cached_input)?;
        d.set_item("cache_write", u.cache_write)?;
        d.set_item("reasoning", u.reasoning)?;
        d.set_item("input_source", u.input_source.name())?;
        d.set_item("output_source", u.output_source.name())?;
        d.set_item("cached_input_source", u.cached_input_source.name())?;
        d.set_item("cache_write_source", u.cache_write_source.name())?;
        d.set_item("reasoning_source", u.reasoning_source.name())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let u = &self.0;
        format!(
            "Usage(input={} ({}), output={} ({}), cached_input={} ({}), cache_write={} ({}), reasoning={} ({}))",
            u.input,
            u.input_source.name(),
            u.output,
            u.output_source.name(),
            u.cached_input,
            u.cached_input_source.name(),
            u.cache_write,
            u.cache_write_source.name(),
            u.reasoning,
            u.reasoning_source.name(),
        )
    }
}

/// Meters one streamed response; fed every raw upstream read in order.
#[pyclass(module = "tokenrelay._core", name = "StreamMeter")]
pub struct PyStreamMeter {
    core: StreamMeter,
    first_token_ns: Option<u64>,
}

impl PyStreamMeter {
    /// Records `time.monotonic_ns()` (the caller's own clock, read once per request) when content starts.
    fn stamp_first_token(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.first_token_ns.is_none() && self.core.content_started() {
            let now = py.import("time")?.getattr("monotonic_ns")?.call0()?;
            self.first_token_ns = Some(now.extract()?);
        }
        Ok(())
    }
}

#[pymethods]
impl PyStreamMeter {
    #[new]
    #[pyo3(signature = (api, model = "", strip_usage = false))]
    fn new(api: &str, model: &str, strip_usage: bool) -> PyResult<Self> {
        Ok(PyStreamMeter {
            core: StreamMeter::new(parse_api(api, false)?, model, strip_usage),
            first_token_ns: None,
        })
    }

    /// `None`: forward `chunk` unchanged; else the bytes to forward instead.
    fn feed<'py>(
        &mut self,
        py: Python<'py>,
        chunk: &[u8],
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let out = self.core.feed(chunk);
        self.stamp_first_token(py)?;
        Ok(out.map(|b| PyBytes::new(py, &b)))
    }

    /// Held-back bytes to forward at the end of the stream (`b""` normally).
    fn flush<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let out = self.core.flush();
        self.stamp_first_token(py)?;
        Ok(PyBytes::new(py, &out))
    }

    /// Usage for the whole request; estimates missing figures with the GIL released.
    #[pyo3(signature = (request_body = None))]
    fn finish(&mut self, py: Python<'_>, request_body: Option<&[u8]>) -> PyUsage {
        // Meters an unterminated last event; held bytes (strip mode) are the caller's to flush() first.
        let _ = self.core.flush();
        let core = &self.core;
        PyUsage(py.detach(|| core.usage(request_body)))
    }

    #[getter]
    fn content_started(&self) -> bool {
        self.core.content_started()
    }
    #[getter]
    fn events(&self) -> u64 {
        self.core.events()
    }
    #[getter]
    fn malformed(&self) -> u64 {
        self.core.malformed()
    }
    #[getter]
    fn oversized(&self) -> u64 {
        self.core.oversized()
    }
    #[getter]
    fn done(&self) -> bool {
        self.core.done()
    }
    #[getter]
    fn finish_reason(&self) -> Option<&str> {
        self.core.finish_reason()
    }
    #[getter]
    fn error<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(e) = self.core.error() else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("type", &e.kind)?;
        d.set_item("message", &e.message)?;
        Ok(Some(d))
    }
    #[getter]
    fn estimate_bytes(&self) -> usize {
        self.core.estimate_bytes()
    }
    #[getter]
    fn first_token_ns(&self) -> Option<u64> {
        self.first_token_ns
    }
    #[getter]
    fn api(&self) -> &'static str {
        self.core.api().name()
    }
}

/// Usage of a non-streaming JSON response body; counting runs with the GIL released.
#[pyfunction]
#[pyo3(signature = (api, body, model = "", request_body = None))]
fn decode_body(
    py: Python<'_>,
    api: &str,
    body: &[u8],
    model: &str,
    request_body: Option<&[u8]>,
) -> PyResult<PyUsage> {
    let api = parse_api(api, true)?;
    Ok(PyUsage(py.detach(|| {
        events::decode_body(api, body, model, request_body)
    })))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyUsage>()?;
    m.add_class::<PyStreamMeter>()?;
    m.add_function(wrap_pyfunction!(decode_body, m)?)?;
    Ok(())
}
