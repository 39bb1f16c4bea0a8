//! Python glue for `crate::tokens`: counting, the model → encoding map, request estimates.

use std::borrow::Cow;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use crate::api::Api;
use crate::tokens::{self, Encoding};

fn encoding(name: &str) -> PyResult<Encoding> {
    Encoding::from_name(name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown encoding {name:?} (expected 'o200k_base' or 'cl100k_base')"
        ))
    })
}

/// The text as UTF-8. A str holding lone surrogates can't be encoded: replace each with U+FFFD, as tiktoken
/// does (`encode("utf-16", "surrogatepass").decode("utf-16", "replace")`).
fn utf8<'a>(text: &'a Bound<'_, PyString>) -> PyResult<Cow<'a, str>> {
    match text.to_str() {
        Ok(s) => Ok(Cow::Borrowed(s)),
        Err(_) => {
            let fixed = text
                .call_method1("encode", ("utf-16", "surrogatepass"))?
                .call_method1("decode", ("utf-16", "replace"))?;
            Ok(Cow::Owned(fixed.extract::<String>()?))
        }
    }
}

/// count_tokens(text, encoding="o200k_base") -> int: tokens in `text`, exactly as tiktoken counts them.
#[pyfunction]
#[pyo3(signature = (text, encoding = "o200k_base"))]
fn count_tokens(py: Python<'_>, text: &Bound<'_, PyString>, encoding: &str) -> PyResult<usize> {
    let encoding = self::encoding(encoding)?;
    let text = utf8(text)?;
    let text: &str = &text;
    Ok(super::detach_if(py, text.len(), || {
        tokens::count(encoding, text)
    }))
}

/// encoding_for_model(model) -> (encoding name, known): `known` is False when the encoding is a guess.
#[pyfunction]
fn encoding_for_model(model: &str) -> (&'static str, bool) {
    let (encoding, known) = tokens::encoding_for_model(model);
    (encoding.name(), known)
}

/// estimate_input_tokens(api, body, model="") -> int: estimated input tokens of a request body.
#[pyfunction]
#[pyo3(signature = (api, body, model = ""))]
fn estimate_input_tokens(py: Python<'_>, api: &str, body: &[u8], model: &str) -> PyResult<usize> {
    let api = Api::from_name(api).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown api {api:?} (expected 'chat', 'completions', 'responses', 'messages' or 'embeddings')"
        ))
    })?;
    Ok(super::detach_if(py, body.len(), || {
        tokens::estimate_input(api, body, model)
    }))
}

/// preload_encoding(encoding="o200k_base") -> None: load an encoding now instead of on first use.
#[pyfunction]
#[pyo3(signature = (encoding = "o200k_base"))]
fn preload_encoding(py: Python<'_>, encoding: &str) -> PyResult<()> {
    let encoding = self::encoding(encoding)?;
    py.detach(|| tokens::preload(encoding));
    Ok(())
}

/// tiktoken_vocabulary(encoding) -> bytes: the vocabulary in tiktoken's `.tiktoken` file format.
#[pyfunction]
fn tiktoken_vocabulary<'py>(py: Python<'py>, encoding: &str) -> PyResult<Bound<'py, PyBytes>> {
    let encoding = self::encoding(encoding)?;
    let data = py.detach(|| tokens::tiktoken_vocabulary(encoding));
    Ok(PyBytes::new(py, &data))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(count_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(encoding_for_model, m)?)?;
    m.add_function(wrap_pyfunction!(estimate_input_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(preload_encoding, m)?)?;
    m.add_function(wrap_pyfunction!(tiktoken_vocabulary, m)?)?;
    Ok(())
}
