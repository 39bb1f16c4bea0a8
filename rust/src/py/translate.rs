//! Python glue for the translators: `translate_request`, `translate_response`, `translate_error` and the
//! `TranslationError` exception. No logic lives here.

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::api::Api;
use crate::translate::{self, Kind, TranslateError};

create_exception!(
    tokenrelay._core,
    TranslationError,
    PyValueError,
    "A request that cannot be translated; `param` names the parameter (or is None)."
);

fn api(name: &str) -> PyResult<Api> {
    Api::from_name(name).ok_or_else(|| PyValueError::new_err(format!("unknown api {name:?}")))
}

fn to_py(py: Python<'_>, e: TranslateError) -> PyErr {
    let err = TranslationError::new_err(e.to_string());
    let param = e.param().map(str::to_owned);
    if let Err(set) = err.value(py).setattr("param", param) {
        return set;
    }
    err
}

/// The request body for a deployment of `kind` ("openai" | "anthropic"), translated from the `client` API.
#[pyfunction]
#[pyo3(signature = (client, kind, body, model, drop_unsupported = false))]
fn translate_request<'py>(
    py: Python<'py>,
    client: &str,
    kind: &str,
    body: &[u8],
    model: &str,
    drop_unsupported: bool,
) -> PyResult<Bound<'py, PyBytes>> {
    let client = api(client)?;
    let kind = Kind::from_name(kind)
        .ok_or_else(|| PyValueError::new_err(format!("unknown deployment kind {kind:?}")))?;
    let out = super::detach_if(py, body.len(), || {
        translate::translate_request(client, kind, body, model, drop_unsupported)
    });
    out.map(|b| PyBytes::new(py, &b)).map_err(|e| to_py(py, e))
}

/// A complete response body translated from the `upstream` API to the `client` API.
#[pyfunction]
fn translate_response<'py>(
    py: Python<'py>,
    upstream: &str,
    client: &str,
    body: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let (upstream, client) = (api(upstream)?, api(client)?);
    let out = super::detach_if(py, body.len(), || {
        translate::translate_response(upstream, client, body)
    });
    out.map(|b| PyBytes::new(py, &b)).map_err(|e| to_py(py, e))
}

/// An upstream error body (of HTTP `status`) in the `client` API's error shape.
#[pyfunction]
fn translate_error<'py>(
    py: Python<'py>,
    upstream: &str,
    client: &str,
    status: u16,
    body: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let out = translate::translate_error(api(upstream)?, api(client)?, status, body);
    Ok(PyBytes::new(py, &out))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("TranslationError", m.py().get_type::<TranslationError>())?;
    m.add("DEFAULT_MAX_TOKENS", translate::DEFAULT_MAX_TOKENS)?;
    m.add_function(wrap_pyfunction!(translate_request, m)?)?;
    m.add_function(wrap_pyfunction!(translate_response, m)?)?;
    m.add_function(wrap_pyfunction!(translate_error, m)?)?;
    Ok(())
}
