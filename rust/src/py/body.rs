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

/// The top-level fields of a request body that the proxy reads (every value but arrays and values over 4 KiB:
/// the messages, tools and inputs stay in the bytes); the whole body is validated, with the GIL released for a
/// long one. ValueError, with a message for the client, when it is not a JSON object.
#[pyfunction]
fn read_body<'py>(py: Python<'py>, raw: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let small = super::detach_if(
        py,
        raw.len(),
        || -> Result<Vec<(String, Value)>, body::BodyError> {
            let members = body::members(raw)?;
            let mut out = Vec::new();
            for m in members {
                let text = m.value.get();
                if text.len() > SMALL_VALUE || text.starts_with('[') {
                    continue;
                }
                let value: Value =
                    serde_json::from_str(text).map_err(|e| body::BodyError::Json(e.to_string()))?;
                out.push((m.key.into_owned(), value));
            }
            Ok(out)
        },
    )
    .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let d = PyDict::new(py);
    for (k, v) in &small {
        d.set_item(k, to_py(py, v)?)?;
    }
    Ok(d)
}

/// `raw` with the given top-level members set to the given raw JSON values (replaced where present, added
/// otherwise), every other byte as the client sent it. ValueError if `raw` is not a JSON object.
#[pyfunction]
fn patch_body<'py>(
    py: Python<'py>,
    raw: &[u8],
    fields: Vec<(String, Vec<u8>)>,
) -> PyResult<Bound<'py, PyBytes>> {
    let set: Vec<(&str, &[u8])> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let out = super::detach_if(py, raw.len(), || body::patch(raw, &set))
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(PyBytes::new(py, &out))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_body, m)?)?;
    m.add_function(wrap_pyfunction!(patch_body, m)?)?;
    Ok(())
}
