//! `FrameEncoder`, `FrameDecoder` and the stream-header helpers for Python.

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use super::errors::{frame_error, stream_codec_error};
use crate::frame::{self, Decoder, FrameError, FrameType, HEADER_LEN};
use crate::stream_codec;

/// Payloads at least this large are kept by reference until `take()` and copied once,
/// straight into the outgoing `bytes`; smaller ones are copied into the staging buffer.
const BY_REFERENCE: usize = 2048;

/// Run `f` over the bytes of any C-contiguous buffer (bytes, bytearray, memoryview...).
fn with_bytes<R>(obj: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> PyResult<R>) -> PyResult<R> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return f(b.as_bytes());
    }
    let buf: PyBuffer<u8> = PyBuffer::get(obj)?;
    let cells = buf
        .as_slice(obj.py())
        .ok_or_else(|| pyo3::exceptions::PyBufferError::new_err("buffer is not C-contiguous"))?;
    // SAFETY: ReadOnlyCell<u8> has the layout of u8; we hold the buffer export and run no
    // Python code while the slice is alive, so nothing can mutate or free it meanwhile.
    let slice = unsafe { std::slice::from_raw_parts(cells.as_ptr() as *const u8, cells.len()) };
    f(slice)
}

fn check_type(type_id: u8) -> PyResult<()> {
    match FrameType::from_u8(type_id) {
        Some(_) => Ok(()),
        None => Err(frame_error(&FrameError::UnknownType { type_id })),
    }
}

fn check_stream_id(stream_id: &str) -> PyResult<()> {
    if stream_id.len() > stream_codec::MAX_ID_LEN {
        return Err(stream_codec_error(&stream_codec::StreamCodecError::IdTooLong {
            length: stream_id.len(),
        }));
    }
    Ok(())
}

/// Coalesces any number of frames into one outgoing `bytes`.
#[pyclass(module = "nerve._core")]
pub struct FrameEncoder {
    max_frame_size: usize,
    staging: Vec<u8>,
    /// (end of staging before this payload, payload kept by reference)
    big: Vec<(usize, Py<PyBytes>)>,
    big_len: usize,
    frames: usize,
}

impl FrameEncoder {
    fn check_len(&self, payload_len: usize) -> PyResult<()> {
        if payload_len + HEADER_LEN > self.max_frame_size {
            return Err(frame_error(&FrameError::PayloadTooLarge {
                length: payload_len,
                maximum: self.max_frame_size,
            }));
        }
        Ok(())
    }

    fn push_body(&mut self, body: &Bound<'_, PyAny>) -> PyResult<()> {
        if let Ok(b) = body.cast::<PyBytes>() {
            let n = b.as_bytes().len();
            if n >= BY_REFERENCE {
                self.big.push((self.staging.len(), b.clone().unbind()));
                self.big_len += n;
                return Ok(());
            }
            self.staging.extend_from_slice(b.as_bytes());
            return Ok(());
        }
        with_bytes(body, |s| {
            self.staging.extend_from_slice(s);
            Ok(())
        })
    }

    fn body_len(body: &Bound<'_, PyAny>) -> PyResult<usize> {
        if let Ok(b) = body.cast::<PyBytes>() {
            return Ok(b.as_bytes().len());
        }
        with_bytes(body, |s| Ok(s.len()))
    }
}

#[pymethods]
impl FrameEncoder {
    #[new]
    #[pyo3(signature = (max_frame_size = frame::DEFAULT_MAX_FRAME_SIZE))]
    fn new(max_frame_size: usize) -> Self {
        FrameEncoder {
            max_frame_size,
            staging: Vec::with_capacity(16 * 1024),
            big: Vec::new(),
            big_len: 0,
            frames: 0,
        }
    }

    /// Append one frame of `type_id` carrying `payload` (any bytes-like object).
    fn append(&mut self, type_id: u8, payload: &Bound<'_, PyAny>) -> PyResult<()> {
        check_type(type_id)?;
        let n = Self::body_len(payload)?;
        self.check_len(n)?;
        self.staging.extend_from_slice(&frame::header(type_id, n));
        self.push_body(payload)?;
        self.frames += 1;
        Ok(())
    }

    /// Append a STREAM_DATA frame: binary stream header, then `chunk` untouched.
    fn append_stream_data(
        &mut self,
        flags: u8,
        stream_id: &str,
        seq: u64,
        chunk: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        check_stream_id(stream_id)?;
        let n = Self::body_len(chunk)?;
        let total = stream_codec::header_len(stream_id) + n;
        self.check_len(total)?;
        self.staging
            .extend_from_slice(&frame::header(FrameType::StreamData as u8, total));
        stream_codec::write_header(&mut self.staging, flags, stream_id, seq)
            .map_err(|e| stream_codec_error(&e))?;
        self.push_body(chunk)?;
        self.frames += 1;
        Ok(())
    }

    /// Append a STREAM_CREDIT frame: the consumer has read `consumed` bytes in total.
    fn append_stream_credit(&mut self, flags: u8, stream_id: &str, consumed: u64) -> PyResult<()> {
        check_stream_id(stream_id)?;
        let total = stream_codec::header_len(stream_id);
        self.check_len(total)?;
        self.staging
            .extend_from_slice(&frame::header(FrameType::StreamCredit as u8, total));
        stream_codec::write_header(&mut self.staging, flags, stream_id, consumed)
            .map_err(|e| stream_codec_error(&e))?;
        self.frames += 1;
        Ok(())
    }

    /// Every appended frame as one `bytes`; the encoder is empty afterwards.
    fn take<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let total = self.staging.len() + self.big_len;
        let out = if self.big.is_empty() {
            PyBytes::new(py, &self.staging)
        } else {
            let staging = &self.staging;
            let big = &self.big;
            PyBytes::new_with(py, total, |dst| {
                let mut at = 0;
                let mut from = 0;
                for (end, b) in big {
                    let small = &staging[from..*end];
                    dst[at..at + small.len()].copy_from_slice(small);
                    at += small.len();
                    from = *end;
                    let payload = b.bind(py).as_bytes();
                    dst[at..at + payload.len()].copy_from_slice(payload);
                    at += payload.len();
                }
                dst[at..].copy_from_slice(&staging[from..]);
                Ok(())
            })?
        };
        self.staging.clear();
        if self.staging.capacity() > 1 << 20 {
            self.staging.shrink_to(16 * 1024);
        }
        self.big.clear();
        self.big_len = 0;
        self.frames = 0;
        Ok(out)
    }

    /// Bytes waiting in the encoder.
    fn __len__(&self) -> usize {
        self.staging.len() + self.big_len
    }

    /// Frames waiting in the encoder.
    #[getter]
    fn frames(&self) -> usize {
        self.frames
    }

    #[getter]
    fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }
}

/// Splits a byte stream into frames, whatever the boundaries of the pieces it is fed.
#[pyclass(module = "nerve._core")]
pub struct FrameDecoder {
    inner: Decoder,
    split_streams: bool,
}

#[pymethods]
impl FrameDecoder {
    #[new]
    #[pyo3(signature = (max_frame_size = frame::DEFAULT_MAX_FRAME_SIZE, *, split_streams = false))]
    fn new(max_frame_size: usize, split_streams: bool) -> PyResult<Self> {
        if max_frame_size < HEADER_LEN || max_frame_size > u32::MAX as usize {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "max_frame_size must be between {HEADER_LEN} and {}",
                u32::MAX
            )));
        }
        Ok(FrameDecoder {
            inner: Decoder::new(max_frame_size),
            split_streams,
        })
    }

    /// Feed received bytes; returns every frame they complete, as `(type, payload)` tuples.
    ///
    /// With `split_streams`, STREAM_DATA frames come out as `(21, flags, stream_id, seq,
    /// chunk)` and STREAM_CREDIT frames as `(22, flags, stream_id, consumed, None)`: the
    /// binary header is parsed here and the chunk is copied once, straight out of `data`.
    fn feed<'py>(&mut self, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
        let py = data.py();
        let out = PyList::empty(py);
        let mut err: Option<PyErr> = None;
        let split = self.split_streams;
        let inner = &mut self.inner;
        let result = with_bytes(data, |bytes| {
            inner
                .feed(bytes, |t, payload| {
                    if err.is_some() {
                        return;
                    }
                    let item = if split
                        && (t == FrameType::StreamData as u8 || t == FrameType::StreamCredit as u8)
                    {
                        stream_item(py, t, payload)
                    } else {
                        PyTuple::new(
                            py,
                            [
                                t.into_pyobject(py).unwrap().into_any(),
                                PyBytes::new(py, payload).into_any(),
                            ],
                        )
                    };
                    if let Err(e) = item.and_then(|tuple| out.append(tuple)) {
                        err = Some(e);
                    }
                })
                .map_err(|e| frame_error(&e))
        });
        result?;
        if let Some(e) = err {
            return Err(e);
        }
        Ok(out)
    }

    /// Bytes held for an incomplete frame.
    #[getter]
    fn buffered(&self) -> usize {
        self.inner.buffered()
    }

    #[getter]
    fn max_frame_size(&self) -> usize {
        self.inner.max_frame_size()
    }
}

fn stream_item<'py>(py: Python<'py>, t: u8, payload: &[u8]) -> PyResult<Bound<'py, PyTuple>> {
    let (flags, id, value, offset) =
        stream_codec::read_header(payload).map_err(|e| stream_codec_error(&e))?;
    let body = if t == FrameType::StreamData as u8 {
        PyBytes::new(py, &payload[offset..]).into_any()
    } else {
        py.None().into_bound(py)
    };
    PyTuple::new(
        py,
        [
            t.into_pyobject(py)?.into_any(),
            flags.into_pyobject(py)?.into_any(),
            id.into_pyobject(py)?.into_any(),
            value.into_pyobject(py)?.into_any(),
            body,
        ],
    )
}

/// One whole frame as `bytes`.
#[pyfunction]
pub fn encode_frame<'py>(type_id: u8, payload: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    check_type(type_id)?;
    let py = payload.py();
    with_bytes(payload, |p| {
        if p.len() + HEADER_LEN > u32::MAX as usize {
            return Err(frame_error(&FrameError::PayloadTooLarge {
                length: p.len(),
                maximum: u32::MAX as usize,
            }));
        }
        PyBytes::new_with(py, HEADER_LEN + p.len(), |dst| {
            dst[..HEADER_LEN].copy_from_slice(&frame::header(type_id, p.len()));
            dst[HEADER_LEN..].copy_from_slice(p);
            Ok(())
        })
    })
}

/// Parse the binary header of a STREAM_DATA / STREAM_CREDIT payload:
/// returns `(flags, stream_id, seq_or_consumed, body_offset)`.
#[pyfunction]
pub fn decode_stream_header(payload: &Bound<'_, PyAny>) -> PyResult<(u8, String, u64, usize)> {
    with_bytes(payload, |p| {
        stream_codec::read_header(p)
            .map(|(f, id, v, off)| (f, id.to_owned(), v, off))
            .map_err(|e| stream_codec_error(&e))
    })
}
