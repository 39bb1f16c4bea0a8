//! Python glue for the stream meter: `Usage`, `StreamMeter`, `decode_body`. No logic lives here.

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::api::Api;
use crate::events::{self, Framed, StreamMeter, Usage};
use crate::plane::{self, FeedError, Metered, SharedMeter};
use crate::translate::unix_now;

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
///
/// Its state is shared with the data plane (`Plane.relay`), which feeds it from its own thread: every method
/// locks it (uncontended but for a relay in progress) and none waits for the GIL while holding the lock.
#[pyclass(frozen, module = "tokenrelay._core", name = "StreamMeter")]
pub struct PyStreamMeter {
    pub(crate) inner: SharedMeter,
}

impl PyStreamMeter {
    fn m(&self) -> MutexGuard<'_, Metered> {
        plane::lock(&self.inner)
    }
}

fn feed_error(e: FeedError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

#[pymethods]
impl PyStreamMeter {
    #[new]
    #[pyo3(signature = (api, model = "", strip_usage = false, translate_to = None))]
    fn new(
        api: &str,
        model: &str,
        strip_usage: bool,
        translate_to: Option<&str>,
    ) -> PyResult<Self> {
        let upstream = parse_api(api, false)?;
        let core = match translate_to.map(|c| parse_api(c, false)).transpose()? {
            Some(client) if client != upstream => {
                StreamMeter::translating(upstream, client, model, !strip_usage, unix_now())
                    .ok_or_else(|| {
                        PyValueError::new_err(format!(
                            "no stream translation from {} to {}",
                            upstream.name(),
                            client.name()
                        ))
                    })?
            }
            _ => StreamMeter::new(upstream, model, strip_usage),
        };
        Ok(PyStreamMeter {
            inner: Arc::new(Mutex::new(Metered::new(core))),
        })
    }

    /// From now on `feed_wire` takes the upstream's wire bytes, delimited by `framing` ("chunked", "length" with
    /// `length`, "close").
    #[pyo3(signature = (framing, length = 0))]
    fn frame(&self, framing: &str, length: u64) -> PyResult<()> {
        self.m().wire = Some(Framed::new(super::h1::framing_arg(framing, length)?));
        Ok(())
    }

    /// Whether `feed_wire` returns chunked framing for the client (set once the client's response is chunked).
    #[getter]
    fn client_chunked(&self) -> bool {
        self.m().wire.as_ref().is_some_and(Framed::client_chunked)
    }
    #[setter]
    fn set_client_chunked(&self, value: bool) -> PyResult<()> {
        match self.m().wire.as_mut() {
            Some(wire) => {
                wire.set_client_chunked(value);
                Ok(())
            }
            None => Err(PyValueError::new_err("client_chunked before frame()")),
        }
    }

    /// Feeds one upstream read (wire bytes: body framing included). `None`: write `data` to the client as it is
    /// (a clean run of whole chunks, or an unframed payload, unedited); else the bytes to write instead, framed
    /// for the client. ValueError on malformed framing.
    fn feed_wire<'py>(
        &self,
        py: Python<'py>,
        data: &[u8],
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let out = self.m().feed_wire(data).map_err(feed_error)?;
        Ok(out.map(|b| PyBytes::new(py, &b)))
    }

    /// The upstream connection closed: completes a body read to the close; ValueError if the body is incomplete.
    fn wire_close(&self) -> PyResult<()> {
        match self.m().wire.as_mut() {
            Some(wire) => wire.close().map_err(super::h1::h1_error),
            None => Ok(()),
        }
    }

    /// The upstream body has been read to its end.
    #[getter]
    fn wire_done(&self) -> bool {
        self.m().wire.as_ref().is_some_and(Framed::done)
    }

    /// Bytes came after the body's end (the connection cannot be reused).
    #[getter]
    fn wire_excess(&self) -> bool {
        self.m().wire.as_ref().is_some_and(Framed::excess)
    }

    /// `None`: forward `chunk` unchanged; else the bytes to forward instead.
    fn feed<'py>(&self, py: Python<'py>, chunk: &[u8]) -> Option<Bound<'py, PyBytes>> {
        let out = {
            let mut m = self.m();
            let out = m.core.feed(chunk);
            m.stamp_first_token();
            out
        };
        out.map(|b| PyBytes::new(py, &b))
    }

    /// Held-back bytes to forward at the end of the stream (`b""` normally).
    fn flush<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let out = {
            let mut m = self.m();
            let out = m.core.flush();
            m.stamp_first_token();
            out
        };
        PyBytes::new(py, &out)
    }

    /// Usage for the whole request; estimates missing figures with the GIL released.
    #[pyo3(signature = (request_body = None))]
    fn finish(&self, py: Python<'_>, request_body: Option<&[u8]>) -> PyUsage {
        // Meters an unterminated last event; held bytes (strip mode) are the caller's to flush() first.
        let work = {
            let mut m = self.m();
            let _ = m.core.flush();
            m.core.work_bytes(request_body.map_or(0, <[u8]>::len))
        };
        // The lock is taken inside the section without the GIL, never held while waiting for it.
        let inner = &self.inner;
        PyUsage(super::detach_if(py, work, || {
            plane::lock(inner).core.usage(request_body)
        }))
    }

    #[getter]
    fn content_started(&self) -> bool {
        self.m().core.content_started()
    }
    #[getter]
    fn events(&self) -> u64 {
        self.m().core.events()
    }
    #[getter]
    fn malformed(&self) -> u64 {
        self.m().core.malformed()
    }
    #[getter]
    fn oversized(&self) -> u64 {
        self.m().core.oversized()
    }
    #[getter]
    fn done(&self) -> bool {
        self.m().core.done()
    }
    #[getter]
    fn finish_reason(&self) -> Option<String> {
        self.m().core.finish_reason().map(str::to_owned)
    }
    #[getter]
    fn error<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let (kind, message) = {
            let m = self.m();
            let Some(e) = m.core.error() else {
                return Ok(None);
            };
            (e.kind.clone(), e.message.clone())
        };
        let d = PyDict::new(py);
        d.set_item("type", kind)?;
        d.set_item("message", message)?;
        Ok(Some(d))
    }
    #[getter]
    fn estimate_bytes(&self) -> usize {
        self.m().core.estimate_bytes()
    }
    /// Bytes `finish()` would tokenize given a request body of `request_len` bytes (0: all reported).
    fn work_bytes(&self, request_len: usize) -> usize {
        self.m().core.work_bytes(request_len)
    }
    #[getter]
    fn first_token_ns(&self) -> Option<u64> {
        self.m().first_token_ns
    }
    #[getter]
    fn api(&self) -> &'static str {
        self.m().core.api().name()
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
    // The parse is as long as the body; the counting only happens for what the provider did not report.
    let req_len = request_body.map_or(0, <[u8]>::len);
    let tally = super::detach_if(py, body.len(), || events::tally_body(api, body));
    Ok(PyUsage(super::detach_if(
        py,
        tally.work_bytes(req_len),
        || tally.usage(api, model, request_body),
    )))
}

/// What a `Pump` tells its owner, `on_event(kind, arg)`: the body ended (`arg`: bytes came after it), ...
const PUMP_END: u8 = 0;
/// ... the upstream's framing was malformed (`arg`: the message), ...
const PUMP_MALFORMED: u8 = 1;
/// ... writing to the client failed (`arg`: the exception: its transport is closed), ...
const PUMP_CLIENT_GONE: u8 = 2;
/// ... or the client's write buffer went past the high-water mark (`arg`: None; `resume()` once it drained).
const PUMP_PAUSED: u8 = 3;

/// The relay of a stream's upstream reads to the client, as the upstream transport's protocol: the event loop
/// calls `data_received` here, and each read is metered (`StreamMeter.feed_wire`) and written to the client
/// without a Python frame in between. The other protocol calls go to the connection's own protocol.
///
/// After END, MALFORMED or CLIENT_GONE it relays nothing more (reads go to the connection's protocol); the owner
/// puts that protocol back on the transport.
#[pyclass(module = "tokenrelay._core", name = "Pump")]
pub struct PyPump {
    meter: Py<PyStreamMeter>,
    /// The upstream response: its `last_read` is set to `time()` at each read (the watchdog's idle clock).
    response: Py<PyAny>,
    time: Py<PyAny>,
    write: Py<PyAny>,
    buffered: Py<PyAny>,
    high: usize,
    protocol: Py<PyAny>,
    on_event: Py<PyAny>,
    paused: bool,
    over: bool,
}

impl PyPump {
    fn report(&mut self, py: Python<'_>, kind: u8, arg: Py<PyAny>) -> PyResult<()> {
        if kind != PUMP_PAUSED {
            self.over = true;
        }
        self.on_event.call1(py, (kind, arg)).map(drop)
    }
}

#[pymethods]
impl PyPump {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        meter: Py<PyStreamMeter>,
        response: Py<PyAny>,
        time: Py<PyAny>,
        write: Py<PyAny>,
        buffered: Py<PyAny>,
        high: usize,
        protocol: Py<PyAny>,
        on_event: Py<PyAny>,
    ) -> Self {
        PyPump {
            meter,
            response,
            time,
            write,
            buffered,
            high,
            protocol,
            on_event,
            paused: false,
            over: false,
        }
    }

    fn data_received(&mut self, py: Python<'_>, data: &Bound<'_, PyBytes>) -> PyResult<()> {
        if self.over {
            return self
                .protocol
                .call_method1(py, intern!(py, "data_received"), (data,))
                .map(drop);
        }
        let now = self.time.call0(py)?;
        self.response.setattr(py, intern!(py, "last_read"), now)?;
        // One lock of the meter per read: its answer, and whether the body ended with it.
        let (fed, done, excess) = {
            let mut meter = self.meter.get().m();
            let fed = meter.feed_wire(data.as_bytes()).map_err(feed_error);
            let wire = meter.wire.as_ref();
            (
                fed,
                wire.is_some_and(Framed::done),
                wire.is_some_and(Framed::excess),
            )
        };
        let written = match fed {
            Err(e) => {
                let message = e.value(py).str()?.unbind().into_any();
                return self.report(py, PUMP_MALFORMED, message);
            }
            Ok(None) => self.write.call1(py, (data,)),
            Ok(Some(out)) if out.is_empty() => Ok(py.None()),
            Ok(Some(out)) => self.write.call1(py, (PyBytes::new(py, &out),)),
        };
        if let Err(e) = written {
            if e.is_instance_of::<PyRuntimeError>(py) || e.is_instance_of::<PyOSError>(py) {
                return self.report(py, PUMP_CLIENT_GONE, e.into_value(py).into_any());
            }
            return Err(e);
        }
        if done {
            let excess = pyo3::types::PyBool::new(py, excess)
                .to_owned()
                .unbind()
                .into_any();
            return self.report(py, PUMP_END, excess);
        }
        if !self.paused && self.buffered.call0(py)?.extract::<usize>(py)? > self.high {
            self.paused = true;
            return self.report(py, PUMP_PAUSED, py.None());
        }
        Ok(())
    }

    /// The client's buffer drained: a later read past the high-water mark reports PAUSED again.
    fn resume(&mut self) {
        self.paused = false;
    }

    fn eof_received(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.protocol.call_method0(py, intern!(py, "eof_received"))
    }

    fn connection_lost(&mut self, py: Python<'_>, exc: Py<PyAny>) -> PyResult<()> {
        self.over = true;
        self.protocol
            .call_method1(py, intern!(py, "connection_lost"), (exc,))
            .map(drop)
    }

    fn pause_writing(&self, py: Python<'_>) -> PyResult<()> {
        self.protocol
            .call_method0(py, intern!(py, "pause_writing"))
            .map(drop)
    }

    fn resume_writing(&self, py: Python<'_>) -> PyResult<()> {
        self.protocol
            .call_method0(py, intern!(py, "resume_writing"))
            .map(drop)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyUsage>()?;
    m.add_class::<PyStreamMeter>()?;
    m.add_class::<PyPump>()?;
    m.add("PUMP_END", PUMP_END)?;
    m.add("PUMP_MALFORMED", PUMP_MALFORMED)?;
    m.add("PUMP_CLIENT_GONE", PUMP_CLIENT_GONE)?;
    m.add("PUMP_PAUSED", PUMP_PAUSED)?;
    m.add_function(wrap_pyfunction!(decode_body, m)?)?;
    Ok(())
}
