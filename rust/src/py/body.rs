//! Python glue for the request body: `read_body`, `patch_body`.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use serde_json::Value;

use crate::body;

/// Top-level values above this size (or arrays of any size) are left out of `read_body`'s dict.
const SMALL_VALUE: usize = 4096;

fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any(),
            (None, Some(u)) => u.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let d = PyDict::new(py);
            for (k, item) in map {
                d.set_item(k, to_py(py, item)?)?;
            }
            d.into_any()
        }
    })
}

/// Where a body's top-level members lie, from `read_body`: `patch_body` of the same bytes needs no second parse.
#[pyclass(name = "BodySpans", module = "tokenrelay._core", frozen)]
pub struct PyBodySpans(body::Spans);

/// `(fields, spans)`: the top-level fields of a request body that the proxy reads (every value but arrays and
/// values over 4 KiB: the messages, tools and inputs stay in the bytes), and where every member lies for
/// `patch_body`. The whole body is validated, with the GIL released for a long one. ValueError, with a message
/// for the client, when it is not a JSON object.
#[pyfunction]
fn read_body<'py>(
    py: Python<'py>,
    raw: &[u8],
) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyBodySpans>)> {
    let (small, spans) = super::detach_if(
        py,
        raw.len(),
        || -> Result<(Vec<(String, Value)>, body::Spans), body::BodyError> {
            let members = body::members(raw)?;
            let mut out = Vec::new();
            for m in &members {
                let text = m.value.get();
                if text.len() > SMALL_VALUE || text.starts_with('[') {
                    continue;
                }
                let value: Value =
                    serde_json::from_str(text).map_err(|e| body::BodyError::Json(e.to_string()))?;
                out.push((m.key.clone().into_owned(), value));
            }
            Ok((out, body::Spans::of(raw, &members)))
        },
    )
    .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let d = PyDict::new(py);
    for (k, v) in &small {
        d.set_item(k, to_py(py, v)?)?;
    }
    Ok((d, Bound::new(py, PyBodySpans(spans))?))
}

/// `raw` with the given top-level members set to the given raw JSON values (replaced where present, added
/// otherwise), every other byte as the client sent it. `spans`: `read_body(raw)`'s, to skip parsing `raw` again.
/// ValueError if `raw` is not a JSON object, or `spans` are of another body.
#[pyfunction]
#[pyo3(signature = (raw, fields, spans = None))]
fn patch_body<'py>(
    py: Python<'py>,
    raw: &[u8],
    fields: Vec<(String, Vec<u8>)>,
    spans: Option<&Bound<'py, PyBodySpans>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let set: Vec<(&str, &[u8])> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let parsed;
    let spans = match spans {
        Some(spans) => &spans.get().0,
        None => {
            let members = super::detach_if(py, raw.len(), || body::members(raw))
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
            parsed = body::Spans::of(raw, &members);
            &parsed
        }
    };
    let plan =
        body::Plan::new(raw, spans, &set).map_err(|e| PyValueError::new_err(e.to_string()))?;
    // Written straight into the bytes object: a long body is copied once, not built and then copied again.
    PyBytes::new_with(py, plan.len(), |buf| {
        let mut at = 0;
        plan.emit(|piece| {
            buf[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        });
        Ok(())
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBodySpans>()?;
    m.add_function(wrap_pyfunction!(read_body, m)?)?;
    m.add_function(wrap_pyfunction!(patch_body, m)?)?;
    Ok(())
}
