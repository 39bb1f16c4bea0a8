//! Python glue for the HTTP/1.1 framing: `parse_response_head`, `BodyDecoder` (the upstream client) and
//! `parse_request_head` (the daemon's front end).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::h1::{self, BodyDecoder, Framing};

pub(crate) fn framing_arg(name: &str, length: u64) -> PyResult<Framing> {
    Framing::from_name(name, length).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown framing {name:?}: expected \"chunked\", \"length\", \"close\" or \"empty\""
        ))
    })
}

pub(crate) fn h1_error(e: h1::H1Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

type HeadTuple = (
    u16,
    String,
    u8,
    Vec<(String, String)>,
    usize,
    &'static str,
    u64,
    bool,
);

/// The response head at the start of `buf`: `None` while incomplete, else `(status, reason, minor_version,
/// headers, head_len, framing, content_length, keep_alive)`; ValueError when it is not HTTP/1.x.
#[pyfunction]
#[pyo3(signature = (buf, head_request = false))]
fn parse_response_head(buf: &[u8], head_request: bool) -> PyResult<Option<HeadTuple>> {
    let Some(h) = h1::parse_head(buf, head_request).map_err(h1_error)? else {
        return Ok(None);
    };
    let length = match h.framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    Ok(Some((
        h.status,
        h.reason,
        h.minor_version,
        h.headers,
        h.len,
        h.framing.name(),
        length,
        h.keep_alive,
    )))
}

type RequestTuple = (
    String,
    String,
    u8,
    Vec<(String, String)>,
    usize,
    Option<u64>,
    bool,
    bool,
);

/// The request head at the start of `buf`: `None` while incomplete, else `(method, target, minor_version,
/// headers, head_len, content_length, unusual, keep_alive)` (`unusual`: a Transfer-Encoding, Expect or Upgrade
/// field); ValueError when it is not a valid HTTP/1.x request head.
#[pyfunction]
fn parse_request_head(buf: &[u8]) -> PyResult<Option<RequestTuple>> {
    let Some(h) = h1::parse_request_head(buf).map_err(h1_error)? else {
        return Ok(None);
    };
    Ok(Some((
        h.method,
        h.target,
        h.minor_version,
        h.headers,
        h.len,
        h.content_length,
        h.unusual,
        h.keep_alive,
    )))
}

/// Decodes one response body from its wire bytes (non-streamed answers and error bodies).
#[pyclass(module = "tokenrelay._core", name = "BodyDecoder")]
pub struct PyBodyDecoder {
    core: BodyDecoder,
    excess: bool,
}

#[pymethods]
impl PyBodyDecoder {
    #[new]
    #[pyo3(signature = (framing, length = 0))]
    fn new(framing: &str, length: u64) -> PyResult<Self> {
        Ok(PyBodyDecoder {
            core: BodyDecoder::new(framing_arg(framing, length)?),
            excess: false,
        })
    }

    /// The payload in `data` (possibly `b""`); ValueError on malformed framing.
    fn decode<'py>(&mut self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = Vec::new();
        let taken = self
            .core
            .decode(data, |r| out.extend_from_slice(&data[r]))
            .map_err(h1_error)?;
        self.excess |= taken < data.len();
        Ok(PyBytes::new(py, &out))
    }

    /// The connection closed: completes a body read to the close; ValueError if the body is incomplete.
    fn close(&mut self) -> PyResult<()> {
        self.core.finish_on_close().map_err(h1_error)
    }

    /// The whole body has been read.
    #[getter]
    fn done(&self) -> bool {
        self.core.done()
    }

    /// Bytes came after the body's end (the connection cannot be reused).
    #[getter]
    fn excess(&self) -> bool {
        self.excess
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBodyDecoder>()?;
    m.add_function(wrap_pyfunction!(parse_response_head, m)?)?;
    m.add_function(wrap_pyfunction!(parse_request_head, m)?)?;
    Ok(())
}
