//! `CreditSender` and `StreamReceiver` for Python: thin wrappers over `crate::flow`. The
//! receiver keeps the very objects it is pushed (any bytes-like), never a copy of their bytes.

use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::errors::flow_error;
use crate::flow::{self, Chunk, FlowError};

/// A pushed Python object and its length in bytes, measured once at push time.
struct PyChunk {
    obj: Py<PyAny>,
    len: usize,
}

impl Chunk for PyChunk {
    fn len(&self) -> usize {
        self.len
    }
}

fn byte_len(obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(b.as_bytes().len());
    }
    let buf = PyUntypedBuffer::get(obj)?;
    let n = buf.len_bytes();
    buf.release(obj.py());
    Ok(n)
}

/// A Python int as a config value within `min..=max`, or FlowError('invalid_config').
fn config<T: TryFrom<i128>>(field: &'static str, got: i128, min: u64, max: u64) -> PyResult<T> {
    let bad = || {
        flow_error(&FlowError::InvalidConfig {
            field,
            got,
            min,
            max,
        })
    };
    if got < min as i128 || got > max as i128 {
        return Err(bad());
    }
    T::try_from(got).map_err(|_| bad())
}

/// The producer's side of a stream: how many bytes it may send under the peer's grants.
#[pyclass(module = "nerve._core")]
pub struct CreditSender {
    inner: flow::CreditSender,
}

#[pymethods]
impl CreditSender {
    #[new]
    fn new(window: i128, max_chunk: i128) -> PyResult<Self> {
        let window = config("window", window, 1, u64::MAX)?;
        let max_chunk = config("max_chunk", max_chunk, 1, usize::MAX as u64)?;
        let inner = flow::CreditSender::new(window, max_chunk).map_err(|e| flow_error(&e))?;
        Ok(CreditSender { inner })
    }

    /// min(want, max_chunk, credit); 0 once closed.
    fn next_chunk_len(&self, want: usize) -> usize {
        self.inner.next_chunk_len(want)
    }

    /// Record a chunk of `n` bytes as sent; returns its seq.
    fn on_sent(&mut self, n: usize) -> PyResult<u64> {
        self.inner.on_sent(n).map_err(|e| flow_error(&e))
    }

    /// Apply the peer's absolute grant; True if the credit grew.
    fn on_credit(&mut self, consumed_total: u64) -> PyResult<bool> {
        self.inner
            .on_credit(consumed_total)
            .map_err(|e| flow_error(&e))
    }

    /// Mark the end; returns the seq of the end marker.
    fn close(&mut self) -> u64 {
        self.inner.close()
    }

    #[getter]
    fn credit(&self) -> u64 {
        self.inner.credit()
    }
    #[getter]
    fn window(&self) -> u64 {
        self.inner.window()
    }
    #[getter]
    fn max_chunk(&self) -> usize {
        self.inner.max_chunk()
    }
    #[getter]
    fn sent(&self) -> u64 {
        self.inner.sent()
    }
    #[getter]
    fn consumed(&self) -> u64 {
        self.inner.consumed()
    }
    #[getter]
    fn next_seq(&self) -> u64 {
        self.inner.next_seq()
    }
    #[getter]
    fn closed(&self) -> bool {
        self.inner.closed()
    }

    fn statistics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.inner;
        let d = PyDict::new(py);
        d.set_item("window", s.window())?;
        d.set_item("max_chunk", s.max_chunk())?;
        d.set_item("sent", s.sent())?;
        d.set_item("consumed", s.consumed())?;
        d.set_item("credit", s.credit())?;
        d.set_item("next_seq", s.next_seq())?;
        d.set_item("closed", s.closed())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let s = &self.inner;
        format!(
            "CreditSender(window={}, sent={}, consumed={}, credit={}, closed={})",
            s.window(),
            s.sent(),
            s.consumed(),
            s.credit(),
            if s.closed() { "True" } else { "False" }
        )
    }
}

/// The consumer's side of a stream: reorders chunks within the window, hands them out in
/// seq order and says when to grant credit. After its first FlowError every push, push_end
/// and pop raises that same error.
#[pyclass(module = "nerve._core")]
pub struct StreamReceiver {
    inner: flow::StreamReceiver<PyChunk>,
}

#[pymethods]
impl StreamReceiver {
    #[new]
    #[pyo3(signature = (window, max_chunk, max_reorder = 64, first_seq = 0))]
    fn new(window: i128, max_chunk: i128, max_reorder: i128, first_seq: i128) -> PyResult<Self> {
        let window = config("window", window, 1, u64::MAX)?;
        let max_chunk = config("max_chunk", max_chunk, 1, usize::MAX as u64)?;
        let max_reorder = config("max_reorder", max_reorder, 0, usize::MAX as u64)?;
        let first_seq = config("first_seq", first_seq, 0, u64::MAX)?;
        let inner = flow::StreamReceiver::new(window, max_chunk, max_reorder, first_seq)
            .map_err(|e| flow_error(&e))?;
        Ok(StreamReceiver { inner })
    }

    /// Accept data chunk `seq`: any bytes-like object, kept as is.
    fn push(&mut self, seq: u64, chunk: &Bound<'_, PyAny>) -> PyResult<()> {
        let len = byte_len(chunk)?;
        let chunk = PyChunk {
            obj: chunk.clone().unbind(),
            len,
        };
        self.inner.push(seq, chunk).map_err(|e| flow_error(&e))
    }

    /// Accept the end marker at `seq` (the seq after the last data chunk).
    fn push_end(&mut self, seq: u64) -> PyResult<()> {
        self.inner.push_end(seq).map_err(|e| flow_error(&e))
    }

    /// The next chunk in seq order (the object pushed), or None if it has not arrived.
    fn pop(&mut self) -> PyResult<Option<Py<PyAny>>> {
        let chunk = self.inner.pop().map_err(|e| flow_error(&e))?;
        Ok(chunk.map(|c| c.obj))
    }

    /// Total bytes consumed, when a grant is due (a quarter window read since the last one).
    fn take_grant(&mut self) -> Option<u64> {
        self.inner.take_grant()
    }

    /// Total bytes consumed, if anything was read since the last grant.
    fn force_grant(&mut self) -> Option<u64> {
        self.inner.force_grant()
    }

    /// The first missing seq when something after it has arrived, else None.
    fn missing(&self) -> Option<u64> {
        self.inner.missing()
    }

    #[getter]
    fn finished(&self) -> bool {
        self.inner.is_finished()
    }
    #[getter]
    fn buffered_bytes(&self) -> u64 {
        self.inner.buffered_bytes()
    }
    #[getter]
    fn received(&self) -> u64 {
        self.inner.received()
    }
    #[getter]
    fn consumed(&self) -> u64 {
        self.inner.consumed()
    }
    #[getter]
    fn next_seq(&self) -> u64 {
        self.inner.next_seq()
    }
    #[getter]
    fn parked(&self) -> usize {
        self.inner.parked()
    }
    #[getter]
    fn window(&self) -> u64 {
        self.inner.window()
    }
    #[getter]
    fn max_chunk(&self) -> usize {
        self.inner.max_chunk()
    }
    #[getter]
    fn max_reorder(&self) -> usize {
        self.inner.max_reorder()
    }
    /// The seq of the end marker, once seen.
    #[getter]
    fn end_seq(&self) -> Option<u64> {
        self.inner.end_seq()
    }
    /// True once a FlowError has been raised (and will be again).
    #[getter]
    fn failed(&self) -> bool {
        self.inner.failed().is_some()
    }

    fn statistics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = &self.inner;
        let d = PyDict::new(py);
        d.set_item("window", r.window())?;
        d.set_item("max_chunk", r.max_chunk())?;
        d.set_item("max_reorder", r.max_reorder())?;
        d.set_item("buffered_bytes", r.buffered_bytes())?;
        d.set_item("received", r.received())?;
        d.set_item("consumed", r.consumed())?;
        d.set_item("last_granted", r.last_granted())?;
        d.set_item("next_seq", r.next_seq())?;
        d.set_item("parked", r.parked())?;
        d.set_item("end_seq", r.end_seq())?;
        d.set_item("finished", r.is_finished())?;
        d.set_item("failed", r.failed().map(|e| e.reason()))?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let r = &self.inner;
        format!(
            "StreamReceiver(window={}, buffered_bytes={}, consumed={}, next_seq={}, parked={})",
            r.window(),
            r.buffered_bytes(),
            r.consumed(),
            r.next_seq(),
            r.parked()
        )
    }
}
