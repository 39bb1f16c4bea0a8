//! `Pool`: the Python face of `crate::balance`. Time is CLOCK_MONOTONIC from the pool's epoch (which the
//! workers sharing a pool's state have in common).

use std::path::PathBuf;

use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString};

use crate::balance::{
    monotonic_ns, BalanceError, BreakerConfig, DeploymentSpec, IndexSet, Outcome, Pick, Pool,
    Strategy, MAX_WORKERS,
};

/// What `pick()` returns when every eligible deployment is at a limit.
const BUSY: isize = -1;
/// What `pick()` returns when no deployment may be used (excluded, down, open circuit, cooling down).
const UNAVAILABLE: isize = -2;

fn to_py_err(err: BalanceError) -> PyErr {
    match err {
        BalanceError::UnknownDeployment { .. } => PyIndexError::new_err(err.to_string()),
        _ => PyValueError::new_err(err.to_string()),
    }
}

/// A route's deployments and their balancing state (`frozen`, thread-safe).
#[pyclass(frozen, name = "Pool", module = "tokenrelay._core")]
pub(crate) struct PyPool {
    core: Pool,
}

impl PyPool {
    fn now(&self) -> f64 {
        self.core.now_at(monotonic_ns())
    }
}

fn exclude_set(exclude: Option<&Bound<'_, PyAny>>) -> PyResult<IndexSet> {
    let mut set = IndexSet::new();
    let Some(exclude) = exclude else {
        return Ok(set);
    };
    if let Ok(list) = exclude.cast::<PyList>() {
        for item in list.iter() {
            set.insert(item.extract::<usize>()?);
        }
    } else {
        for item in exclude.try_iter()? {
            set.insert(item?.extract::<usize>()?);
        }
    }
    Ok(set)
}

fn field_int<T: for<'a, 'py> FromPyObject<'a, 'py>>(
    value: &Bound<'_, PyAny>,
    field: &str,
) -> PyResult<T> {
    if value.is_instance_of::<PyBool>() {
        return Err(PyValueError::new_err(format!(
            "{field}: expected an int, got a bool"
        )));
    }
    value
        .extract::<T>()
        .map_err(|_| PyValueError::new_err(format!("{field}: expected a non-negative int")))
}

fn optional_int<T: for<'a, 'py> FromPyObject<'a, 'py>>(
    value: &Bound<'_, PyAny>,
    field: &str,
) -> PyResult<Option<T>> {
    if value.is_none() {
        Ok(None)
    } else {
        field_int(value, field).map(Some)
    }
}

fn parse_spec(i: usize, item: &Bound<'_, PyAny>) -> PyResult<DeploymentSpec> {
    let dict = item
        .cast::<PyDict>()
        .map_err(|_| PyValueError::new_err(format!("deployments[{i}]: expected a dict")))?;
    let mut spec = DeploymentSpec::new("");
    let mut named = false;
    for (key, value) in dict.iter() {
        let key = key
            .cast::<PyString>()
            .map_err(|_| PyValueError::new_err(format!("deployments[{i}]: keys must be str")))?
            .to_cow()?;
        let field = format!("deployments[{i}].{key}");
        match key.as_ref() {
            "name" => {
                spec.name = value
                    .cast::<PyString>()
                    .map_err(|_| PyValueError::new_err(format!("{field}: expected a str")))?
                    .to_cow()?
                    .into_owned();
                named = true;
            }
            "weight" => spec.weight = field_int(&value, &field)?,
            "tier" => spec.tier = field_int(&value, &field)?,
            "max_concurrent" => spec.max_concurrent = optional_int(&value, &field)?,
            "rpm" => spec.rpm = optional_int(&value, &field)?,
            "tpm" => spec.tpm = optional_int(&value, &field)?,
            _ => return Err(PyValueError::new_err(format!("{field}: unknown field"))),
        }
    }
    if !named {
        return Err(PyValueError::new_err(format!(
            "deployments[{i}].name: missing"
        )));
    }
    Ok(spec)
}

#[pymethods]
impl PyPool {
    /// `pick()` result: every eligible deployment is at its concurrency, rpm or tpm limit.
    #[classattr]
    const BUSY: isize = BUSY;
    /// `pick()` result: every deployment is excluded, down, open-circuited or cooling down.
    #[classattr]
    const UNAVAILABLE: isize = UNAVAILABLE;
    /// Most workers a shared pool keeps rows for (worker indexes are taken modulo this).
    #[classattr]
    const MAX_WORKERS: usize = MAX_WORKERS;

    #[new]
    #[pyo3(signature = (
        deployments, strategy = "p2c", *, breaker_failures = 3, breaker_error_rate = 0.5,
        breaker_window_s = 30.0, breaker_min_requests = 10, cooldown_s = 10.0, max_cooldown_s = 120.0,
        shared = None, worker = 0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        deployments: &Bound<'_, PyList>,
        strategy: &str,
        breaker_failures: u32,
        breaker_error_rate: f64,
        breaker_window_s: f64,
        breaker_min_requests: u32,
        cooldown_s: f64,
        max_cooldown_s: f64,
        shared: Option<PathBuf>,
        worker: usize,
    ) -> PyResult<Self> {
        let strategy = Strategy::from_name(strategy).ok_or_else(|| {
            let names: Vec<&str> = Strategy::ALL.iter().map(|s| s.name()).collect();
            PyValueError::new_err(format!(
                "strategy: unknown {strategy:?}, expected one of {}",
                names.join(", ")
            ))
        })?;
        let specs = deployments
            .iter()
            .enumerate()
            .map(|(i, item)| parse_spec(i, &item))
            .collect::<PyResult<_>>()?;
        let breaker = BreakerConfig {
            failures: breaker_failures,
            error_rate: breaker_error_rate,
            window_s: breaker_window_s,
            min_requests: breaker_min_requests,
            cooldown_s,
            max_cooldown_s,
        };
        let core = match shared {
            None => Pool::new(specs, strategy, breaker),
            Some(path) => Pool::shared(specs, strategy, breaker, &path, worker),
        }
        .map_err(to_py_err)?;
        Ok(PyPool { core })
    }

    /// Whether the state is shared with the daemon's other workers (`shared=` a file).
    #[getter]
    fn shared(&self) -> bool {
        self.core.is_shared()
    }

    /// Tells the other workers whether this one has requests queued for room on this pool.
    fn set_waiting(&self, waiting: bool) {
        self.core.set_waiting(waiting);
    }

    /// The other workers with requests queued for room, as a bit set by worker index (0 unless shared).
    fn others_waiting(&self) -> u32 {
        self.core.others_waiting()
    }

    /// The strategy's name.
    #[getter]
    fn strategy(&self) -> &'static str {
        self.core.strategy().name()
    }

    /// Picks a deployment, skipping `exclude`, and reserves a slot on it. Returns its index (>= 0), or
    /// `Pool.BUSY` (-1) / `Pool.UNAVAILABLE` (-2); then `retry_after()` says how long to wait.
    #[pyo3(signature = (exclude = None))]
    fn pick(&self, exclude: Option<&Bound<'_, PyAny>>) -> PyResult<isize> {
        let exclude = exclude_set(exclude)?;
        Ok(match self.core.pick(&exclude, self.now()) {
            // At most MAX_DEPLOYMENTS (256): fits.
            Pick::Picked(idx) => idx as isize,
            Pick::AllBusy { .. } => BUSY,
            Pick::Unavailable { .. } => UNAVAILABLE,
        })
    }

    /// Seconds until `pick(exclude)` may succeed: 0.0 if it would now, None if no deployment comes back on its
    /// own (all excluded or down). Reserves nothing.
    #[pyo3(signature = (exclude = None))]
    fn retry_after(&self, exclude: Option<&Bound<'_, PyAny>>) -> PyResult<Option<f64>> {
        let exclude = exclude_set(exclude)?;
        Ok(self.core.retry_after(&exclude, self.now()))
    }

    /// Records the time to first token of a request on `idx`.
    fn first_token(&self, idx: usize, ttft_s: f64) -> PyResult<()> {
        self.core.first_token(idx, ttft_s).map_err(to_py_err)
    }

    /// Ends the reservation `pick()` made on `idx`.
    #[pyo3(signature = (idx, outcome, output_tokens = 0, total_tokens = 0, duration_s = 0.0))]
    fn release(
        &self,
        idx: usize,
        outcome: &str,
        output_tokens: u64,
        total_tokens: u64,
        duration_s: f64,
    ) -> PyResult<()> {
        let outcome = Outcome::from_name(outcome).ok_or_else(|| {
            PyValueError::new_err(format!(
                "outcome: unknown {outcome:?}, expected success, failure, rate_limited, cancelled or client_gone"
            ))
        })?;
        self.core
            .release(
                idx,
                outcome,
                output_tokens,
                total_tokens,
                duration_s,
                self.now(),
            )
            .map_err(to_py_err)
    }

    /// Keeps `idx` out of picks for `seconds` (a later end wins over an earlier one).
    fn cooldown(&self, idx: usize, seconds: f64) -> PyResult<()> {
        self.core
            .cooldown(idx, seconds, self.now())
            .map_err(to_py_err)
    }

    /// An active health check's verdict on `idx`.
    fn set_health(&self, idx: usize, up: bool) -> PyResult<()> {
        self.core.set_health(idx, up, self.now()).map_err(to_py_err)
    }

    /// Every deployment's state, as a list of dicts in index order.
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for snap in self.core.snapshot(self.now()) {
            let d = PyDict::new(py);
            d.set_item("name", &snap.spec.name)?;
            d.set_item("state", snap.state)?;
            d.set_item("until_s", snap.until_s)?;
            d.set_item("outstanding", snap.outstanding)?;
            d.set_item("ewma_ttft_s", snap.ewma_ttft_s)?;
            d.set_item("ewma_tokens_per_s", snap.ewma_tokens_per_s)?;
            d.set_item("error_rate", snap.error_rate)?;
            d.set_item("requests", snap.requests)?;
            d.set_item("failures", snap.failures)?;
            d.set_item("rate_limited", snap.rate_limited)?;
            d.set_item("rpm_used", snap.rpm_used)?;
            d.set_item("tpm_used", snap.tpm_used)?;
            d.set_item("weight", snap.spec.weight)?;
            d.set_item("tier", snap.spec.tier)?;
            d.set_item("max_concurrent", snap.spec.max_concurrent)?;
            d.set_item("rpm", snap.spec.rpm)?;
            d.set_item("tpm", snap.spec.tpm)?;
            list.append(d)?;
        }
        Ok(list)
    }

    fn __len__(&self) -> usize {
        self.core.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "<Pool {} deployments, strategy {:?}>",
            self.core.len(),
            self.core.strategy().name()
        )
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPool>()
}
