//! Python glue for the meters: `Meters`, `histogram_quantiles`, `histogram_merge` and the bucket constants.

use crate::meter::histogram::{Histogram, BOUNDS};
use crate::meter::rate;
use crate::meter::{self, BucketKey, FieldValue, MeterError, Record, Row, ERROR_CLASSES};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

fn to_py(e: MeterError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// The bucket key fields of a drained row, in order.
const KEY_FIELDS: [&str; 8] = [
    "minute",
    "route",
    "deployment",
    "model",
    "key_id",
    "key_name",
    "run",
    "tags",
];

/// In-memory usage meters: `record()` per finished request, `drain()` deltas for the ledger.
#[pyclass(frozen, module = "tokenrelay._core")]
struct Meters(meter::Meters);

fn row_dict<'py>(
    py: Python<'py>,
    key: Option<&BucketKey>,
    row: &Row,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    if let Some(k) = key {
        d.set_item("minute", k.minute)?;
        d.set_item("route", &*k.route)?;
        d.set_item("deployment", &*k.deployment)?;
        d.set_item("model", &*k.model)?;
        d.set_item("key_id", &*k.key_id)?;
        d.set_item("key_name", &*k.key_name)?;
        d.set_item("run", &*k.run)?;
        d.set_item("tags", &*k.tags)?;
    }
    for (name, value) in row.fields() {
        match value {
            FieldValue::Int(n) => d.set_item(name, n)?,
            FieldValue::Float(f) => d.set_item(name, f)?,
            FieldValue::Hist(s) => d.set_item(name, s)?,
        }
    }
    Ok(d)
}

fn parse_row(d: &Bound<'_, PyDict>) -> PyResult<(BucketKey, Row)> {
    let text = |name: &str| -> PyResult<Box<str>> {
        match d.get_item(name)? {
            Some(v) => Ok(v.extract::<String>()?.into()),
            None => Err(PyValueError::new_err(format!("meter row without {name:?}"))),
        }
    };
    let minute: i64 = match d.get_item("minute")? {
        Some(v) => v.extract()?,
        None => return Err(PyValueError::new_err("meter row without \"minute\"")),
    };
    let key = BucketKey {
        minute,
        route: text("route")?,
        deployment: text("deployment")?,
        model: text("model")?,
        key_id: text("key_id")?,
        key_name: text("key_name")?,
        run: text("run")?,
        tags: text("tags")?,
    };
    let mut row = Row::default();
    for (name, value) in d.iter() {
        let name: String = name.extract()?;
        if KEY_FIELDS.contains(&name.as_str()) {
            continue;
        }
        let value = if value.is_instance_of::<PyString>() {
            FieldValue::Hist(value.extract()?)
        } else if value.is_instance_of::<PyInt>() {
            FieldValue::Int(
                value
                    .extract()
                    .map_err(|_| to_py(MeterError::BadField(name.clone())))?,
            )
        } else if value.is_instance_of::<PyFloat>() {
            FieldValue::Float(value.extract()?)
        } else {
            return Err(to_py(MeterError::BadField(name)));
        };
        row.add_field(&name, &value).map_err(to_py)?;
    }
    Ok((key, row))
}

#[pymethods]
impl Meters {
    #[new]
    fn new() -> Self {
        Meters(meter::Meters::new())
    }

    /// Counts one finished request. Raises `ValueError` on an unknown `error_class`.
    #[pyo3(signature = (
        *, ts, route, deployment, model, key_id, key_name, run, tags, status, error_class,
        input, output, cached_input, cache_write, reasoning,
        input_estimated, output_estimated, cached_estimated, cache_write_estimated, reasoning_estimated,
        cost_usd, ttft_s, duration_s, stream, api
    ))]
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        ts: f64,
        route: &str,
        deployment: &str,
        model: &str,
        key_id: &str,
        key_name: &str,
        run: &str,
        tags: &str,
        status: u16,
        error_class: &str,
        input: u64,
        output: u64,
        cached_input: u64,
        cache_write: u64,
        reasoning: u64,
        input_estimated: bool,
        output_estimated: bool,
        cached_estimated: bool,
        cache_write_estimated: bool,
        reasoning_estimated: bool,
        cost_usd: Option<f64>,
        ttft_s: Option<f64>,
        duration_s: f64,
        stream: bool,
        api: &str,
    ) -> PyResult<()> {
        // Accepted so the relay hands over one complete description; the aggregates do not split on them.
        let _ = (stream, api);
        self.0
            .record(&Record {
                ts,
                route,
                deployment,
                model,
                key_id,
                key_name,
                run,
                tags,
                status,
                error_class,
                tokens: [input, output, cached_input, cache_write, reasoning],
                estimated: [
                    input_estimated,
                    output_estimated,
                    cached_estimated,
                    cache_write_estimated,
                    reasoning_estimated,
                ],
                cost_usd,
                ttft_s,
                duration_s,
            })
            .map_err(to_py)
    }

    /// Deltas since the last drain: one dict per (minute, route, deployment, model, key_id, key_name, run,
    /// tags) bucket.
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let rows = py.detach(|| self.0.drain());
        let list = PyList::empty(py);
        for (key, row) in &rows {
            list.append(row_dict(py, Some(key), row)?)?;
        }
        Ok(list)
    }

    /// Puts back drained rows whose write failed (added to anything recorded since; never double counted).
    /// All rows are validated before any is restored.
    fn restore(&self, rows: Vec<Bound<'_, PyDict>>) -> PyResult<()> {
        let parsed = rows.iter().map(parse_row).collect::<PyResult<Vec<_>>>()?;
        self.0.restore(parsed);
        Ok(())
    }

    /// Number of buckets waiting for the next drain.
    fn pending_buckets(&self) -> usize {
        self.0.pending_buckets()
    }

    /// Cumulative counters since start as Prometheus text (exposition format 0.0.4).
    fn prometheus(&self, py: Python<'_>) -> String {
        py.detach(|| self.0.prometheus())
    }

    /// Cumulative totals since start: the row counters (histograms as text) plus `errors`.
    fn totals<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let totals = self.0.totals();
        let d = row_dict(py, None, &totals)?;
        d.set_item("errors", totals.errors.iter().sum::<u64>())?;
        Ok(d)
    }
}

/// Quantiles (each q in 0..1) of a histogram in its text form; `None` where it is empty.
#[pyfunction]
fn histogram_quantiles(buckets: &str, qs: Vec<f64>) -> PyResult<Vec<Option<f64>>> {
    let hist = Histogram::decode(buckets).map_err(to_py)?;
    Ok(qs.into_iter().map(|q| hist.quantile(q)).collect())
}

/// The sum of two histograms in text form (NULL-tolerant: `None` reads as empty), for SQL and queries.
#[pyfunction]
#[pyo3(signature = (a, b, /))]
fn histogram_merge(a: Option<&str>, b: Option<&str>) -> PyResult<String> {
    let mut hist = Histogram::decode(a.unwrap_or("")).map_err(to_py)?;
    hist.merge(&Histogram::decode(b.unwrap_or("")).map_err(to_py)?);
    Ok(hist.encode())
}

/// Tokens per second over the last `window_s` seconds (the live view's graph): see `rate::TokenRate`.
#[pyclass(module = "tokenrelay._core")]
struct TokenRate(rate::TokenRate);

#[pymethods]
impl TokenRate {
    #[new]
    #[pyo3(signature = (window_s = 600))]
    fn new(window_s: usize) -> PyResult<Self> {
        if window_s == 0 || window_s > 86_400 {
            return Err(PyValueError::new_err("window_s must be 1..86400 seconds"));
        }
        Ok(TokenRate(rate::TokenRate::new(window_s)))
    }

    /// Seconds in the window.
    #[getter]
    fn n(&self) -> usize {
        self.0.window()
    }

    /// Adds `tokens` on `side` (0 in, 1 out) spread evenly over [start, end] (Unix seconds).
    #[pyo3(signature = (side, tokens, start, end, now))]
    fn add(&mut self, side: usize, tokens: f64, start: f64, end: f64, now: f64) {
        self.0.add(side, tokens, start, end, now);
    }

    /// One finished request: input tokens at `start`, output from `first_token` (None: `start`) to `end`.
    #[pyo3(signature = (input, output, start, first_token, end, now))]
    fn add_request(
        &mut self,
        input: f64,
        output: f64,
        start: f64,
        first_token: Option<f64>,
        end: f64,
        now: f64,
    ) {
        self.0
            .add_request(input, output, start, first_token, end, now);
    }

    /// Tokens in and out for each of the last `seconds` whole seconds before `now`, oldest first.
    fn series(&mut self, seconds: usize, now: f64) -> (Vec<f64>, Vec<f64>) {
        self.0.series(seconds, now)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Meters>()?;
    m.add_class::<TokenRate>()?;
    m.add_function(wrap_pyfunction!(histogram_quantiles, m)?)?;
    m.add_function(wrap_pyfunction!(histogram_merge, m)?)?;
    m.add("HISTOGRAM_BOUNDS", PyTuple::new(m.py(), BOUNDS)?)?;
    m.add("METER_ERROR_CLASSES", PyTuple::new(m.py(), ERROR_CLASSES)?)?;
    Ok(())
}
