//! `FrameEncoder`, `FrameDecoder` and the stream-header helpers for Python.

use std::fs::File;
use std::io::Read;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;

use pyo3::buffer::PyBuffer;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyMemoryView, PyTuple};

use super::errors::{frame_error, frame_error_again, stream_codec_error};
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

/// A new `bytes` of `len` bytes whose content is NOT initialised: the caller must write every
/// byte before the object is seen by any Python code (pyo3's `new_with` zero-fills first, a
/// pass over the memory that a chunk about to be overwritten does not need).
fn uninit_bytes(py: Python<'_>, len: usize) -> PyResult<(Bound<'_, PyBytes>, *mut u8)> {
    // SAFETY: PyBytes_FromStringAndSize(NULL, n) returns a new reference to a bytes object
    // of n (uninitialised) bytes, or NULL with an exception set; PyBytes_AsString gives its
    // buffer, valid while the object lives.
    unsafe {
        let ptr = ffi::PyBytes_FromStringAndSize(std::ptr::null(), len as ffi::Py_ssize_t);
        let bytes = Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked::<PyBytes>();
        let data = ffi::PyBytes_AsString(ptr) as *mut u8;
        Ok((bytes, data))
    }
}

/// An immutable payload that may be kept by reference until it is written: a `bytes`, or a
/// memoryview over one (what `PacketStream.send` makes when it splits a large `bytes`).
/// Anything else (a bytearray, a view of one) could change after `append` returns and is
/// copied at once.
fn immutable(body: &Bound<'_, PyAny>) -> bool {
    if body.cast::<PyBytes>().is_ok() {
        return true;
    }
    if body.cast::<PyMemoryView>().is_err() {
        return false;
    }
    let py = body.py();
    // a plain 1-D view of bytes (len() is its size in bytes), over an immutable `bytes`
    let plain = |name: &pyo3::Bound<'_, pyo3::types::PyString>, want: usize| {
        body.getattr(name).and_then(|v| v.extract::<usize>()).is_ok_and(|v| v == want)
    };
    plain(pyo3::intern!(py, "ndim"), 1)
        && plain(pyo3::intern!(py, "itemsize"), 1)
        && body.getattr(pyo3::intern!(py, "obj")).is_ok_and(|o| o.is_exact_instance_of::<PyBytes>())
}

/// Coalesces any number of frames into one outgoing `bytes`.
#[pyclass(module = "nerve._core")]
pub struct FrameEncoder {
    max_frame_size: usize,
    staging: Vec<u8>,
    /// (end of staging before this payload, immutable payload kept by reference)
    big: Vec<(usize, Py<PyAny>)>,
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

    /// Queue a payload of `n` bytes: a large immutable one by reference, anything else copied.
    fn push_body(&mut self, body: &Bound<'_, PyAny>, n: usize) -> PyResult<()> {
        if n >= BY_REFERENCE && immutable(body) {
            self.big.push((self.staging.len(), body.clone().unbind()));
            self.big_len += n;
            return Ok(());
        }
        with_bytes(body, |s| {
            self.staging.extend_from_slice(s);
            Ok(())
        })
    }

    fn reset(&mut self) {
        self.staging.clear();
        if self.staging.capacity() > 1 << 20 {
            self.staging.shrink_to(16 * 1024);
        }
        self.big.clear();
        self.big_len = 0;
        self.frames = 0;
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
        self.push_body(payload, n)?;
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
        self.push_body(chunk, n)?;
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
            let (out, dst) = uninit_bytes(py, total)?;
            // SAFETY: `dst` is `total` writable bytes owned by `out`, which no Python code has
            // seen yet; every byte is written below (staging pieces and payloads add up to it).
            let dst = unsafe { std::slice::from_raw_parts_mut(dst, total) };
            let mut at = 0;
            let mut from = 0;
            for (end, b) in &self.big {
                let small = &self.staging[from..*end];
                dst[at..at + small.len()].copy_from_slice(small);
                at += small.len();
                from = *end;
                at += with_bytes(b.bind(py), |payload| {
                    dst[at..at + payload.len()].copy_from_slice(payload);
                    Ok(payload.len())
                })?;
            }
            dst[at..].copy_from_slice(&self.staging[from..]);
            out
        };
        self.reset();
        Ok(out)
    }

    /// Every appended frame as a list of bytes-like parts to write in order (one
    /// `writev`): the headers and small payloads joined into `bytes` between the large
    /// payloads, which are handed out as they were given, never copied. The encoder is empty
    /// afterwards.
    fn take_parts<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let mut from = 0;
        for (end, b) in &self.big {
            if *end > from {
                out.append(PyBytes::new(py, &self.staging[from..*end]))?;
            }
            from = *end;
            out.append(b.bind(py))?;
        }
        if self.staging.len() > from {
            out.append(PyBytes::new(py, &self.staging[from..]))?;
        }
        self.reset();
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

/// A large STREAM_DATA frame being received straight into its chunk (see `FrameDecoder`).
struct Direct {
    flags: u8,
    id: String,
    seq: u64,
    /// The chunk: `len` bytes, of which the first `filled` are written. Never seen by Python
    /// code before it is complete: only `feed` and `read_from` write into it.
    chunk: Py<PyBytes>,
    data: *mut u8,
    len: usize,
    filled: usize,
}

// SAFETY: `data` points into `chunk`, which this struct keeps alive; it is only used by the
// decoder's methods, which need the decoder borrowed mutably (one thread at a time; while
// `read_from` reads without the GIL the borrow is held, so no other call can reach it).
unsafe impl Send for Direct {}
unsafe impl Sync for Direct {}

/// Splits a byte stream into frames, whatever the boundaries of the pieces it is fed.
///
/// With `split_streams`, a STREAM_DATA frame of at least `direct_min` bytes whose start is
/// fed but not its end is received *directly*: its chunk is allocated once (a `bytes` of the
/// chunk's size) and the rest of the frame's bytes are written into it, either by `feed` or,
/// while `direct_missing` is non-zero, by `read_from(fd)`, which reads from a non-blocking
/// descriptor straight into the chunk (the one system call of this crate: the bulk path's
/// read, done here so that no Python code ever holds a writable view of a chunk that is not
/// complete). The chunk is handed out only once complete. After any error the decoder is
/// poisoned: every later call raises that error again.
#[pyclass(module = "nerve._core")]
pub struct FrameDecoder {
    inner: Decoder,
    split_streams: bool,
    direct_min: usize,
    direct: Option<Direct>,
    /// (message, reason) of the error that poisoned the decoder: every later call raises a
    /// fresh FrameError with them (not the exception object, which would keep its traceback).
    broken: Option<(String, String)>,
}

impl FrameDecoder {
    fn check_sound(&self) -> PyResult<()> {
        match &self.broken {
            Some((message, reason)) => Err(frame_error_again(message, reason)),
            None => Ok(()),
        }
    }

    /// Poison the decoder with `result`'s error, if any: it lost its place in the stream.
    fn poison_on<T>(&mut self, py: Python<'_>, result: PyResult<T>) -> PyResult<T> {
        if let Err(e) = &result {
            let value = e.value(py);
            let message = value.str().map(|m| m.to_string()).unwrap_or_default();
            let reason = value
                .getattr(pyo3::intern!(py, "reason"))
                .and_then(|r| r.extract::<String>())
                .unwrap_or_else(|_| "decoder_failed".to_owned());
            self.broken = Some((message, reason));
            self.direct = None;
        }
        result
    }

    /// Write `bytes` (the next bytes of the stream) into the direct chunk; returns how many
    /// were taken, and pushes the chunk's item to `out` once complete.
    fn fill_direct<'py>(&mut self, py: Python<'py>, bytes: &[u8], out: &Bound<'py, PyList>) -> PyResult<usize> {
        let d = self.direct.as_mut().expect("direct frame in progress");
        let take = (d.len - d.filled).min(bytes.len());
        // SAFETY: `d.data` has `d.len` bytes; `filled + take <= len`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), d.data.add(d.filled), take) };
        d.filled += take;
        self.finish_direct(py, out)?;
        Ok(take)
    }

    fn finish_direct<'py>(&mut self, py: Python<'py>, out: &Bound<'py, PyList>) -> PyResult<()> {
        if matches!(&self.direct, Some(d) if d.filled == d.len) {
            let d = self.direct.take().expect("checked");
            let chunk = d.chunk.into_bound(py).into_any();
            out.append(stream_tuple(py, FrameType::StreamData as u8, d.flags, &d.id, d.seq, chunk)?)?;
        }
        Ok(())
    }

    /// Start receiving the frame that begins `frame` (header validated, incomplete) directly.
    fn start_direct<'py>(&mut self, py: Python<'py>, frame: &[u8], total: usize, out: &Bound<'py, PyList>) -> PyResult<()> {
        let (flags, id, seq, offset) =
            stream_codec::read_header(&frame[HEADER_LEN..]).map_err(|e| stream_codec_error(&e))?;
        let body_at = HEADER_LEN + offset;
        let len = total - body_at;
        let (chunk, data) = uninit_bytes(py, len)?;
        self.direct = Some(Direct {
            flags,
            id: id.to_owned(),
            seq,
            chunk: chunk.unbind(),
            data,
            len,
            filled: 0,
        });
        self.fill_direct(py, &frame[body_at..], out)?;
        Ok(())
    }

    fn feed_bytes<'py>(&mut self, py: Python<'py>, mut bytes: &[u8], out: &Bound<'py, PyList>) -> PyResult<()> {
        if self.direct.is_some() {
            let took = self.fill_direct(py, bytes, out)?;
            bytes = &bytes[took..];
        }
        let split = self.split_streams;
        let direct_min = if split { self.direct_min } else { usize::MAX };
        while !bytes.is_empty() {
            let mut err: Option<PyErr> = None;
            let diverted = self
                .inner
                .feed_divert(
                    bytes,
                    |t, payload| {
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
                    },
                    |t, total, avail| {
                        // only once the stream header is in: it names the chunk's size
                        t == FrameType::StreamData as u8
                            && total >= direct_min
                            && stream_codec::header_len_in(&avail[HEADER_LEN..])
                                .is_some_and(|n| avail.len() >= HEADER_LEN + n)
                    },
                )
                .map_err(|e| frame_error(&e))?;
            if let Some(e) = err {
                return Err(e);
            }
            match diverted {
                None => break,
                Some((at, total)) => {
                    self.start_direct(py, &bytes[at..], total, out)?;
                    // `frame` is shorter than `total`: all of `bytes` went into the chunk
                    bytes = &[];
                }
            }
        }
        Ok(())
    }
}

#[pymethods]
impl FrameDecoder {
    #[new]
    #[pyo3(signature = (max_frame_size = frame::DEFAULT_MAX_FRAME_SIZE, *, split_streams = false, direct_min = 64 * 1024))]
    fn new(max_frame_size: usize, split_streams: bool, direct_min: usize) -> PyResult<Self> {
        if max_frame_size < HEADER_LEN || max_frame_size > u32::MAX as usize {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "max_frame_size must be between {HEADER_LEN} and {}",
                u32::MAX
            )));
        }
        Ok(FrameDecoder {
            inner: Decoder::new(max_frame_size),
            split_streams,
            direct_min: direct_min.max(HEADER_LEN + 11),
            direct: None,
            broken: None,
        })
    }

    /// Feed received bytes; returns every frame they complete, as `(type, payload)` tuples.
    ///
    /// With `split_streams`, STREAM_DATA frames come out as `(21, flags, stream_id, seq,
    /// chunk)` and STREAM_CREDIT frames as `(22, flags, stream_id, consumed, None)`: the
    /// binary header is parsed here and the chunk is copied once, straight out of `data`
    /// (or, for a large frame fed in pieces, into the chunk as the pieces come).
    fn feed<'py>(&mut self, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
        let py = data.py();
        self.check_sound()?;
        let out = PyList::empty(py);
        let result = with_bytes(data, |bytes| self.feed_bytes(py, bytes, &out));
        self.poison_on(py, result)?;
        Ok(out)
    }

    /// Bytes still missing from the large frame being received directly (0: none is).
    /// While non-zero, the next bytes of the connection belong to it: `read_from(fd)`.
    #[getter]
    fn direct_missing(&self) -> usize {
        self.direct.as_ref().map_or(0, |d| d.len - d.filled)
    }

    /// Read at most `direct_missing` bytes from the non-blocking descriptor `fd` straight into
    /// the chunk being received directly, without the GIL. Returns `(n, frames)`: `n` bytes
    /// read (0: end of file), `frames` the chunk's item once its last byte is in. Raises
    /// `BlockingIOError` when nothing is there yet and `OSError` as `read(2)` fails; a
    /// `ValueError` if no frame is being received directly.
    fn read_from<'py>(&mut self, py: Python<'py>, fd: i32) -> PyResult<(usize, Bound<'py, PyList>)> {
        self.check_sound()?;
        let Some(d) = self.direct.as_ref() else {
            return Err(pyo3::exceptions::PyValueError::new_err("no frame is being received directly"));
        };
        if fd < 0 {
            return Err(pyo3::exceptions::PyValueError::new_err(format!("not a descriptor: {fd}")));
        }
        // SAFETY: [filled, len) of the chunk is ours to write (the chunk is kept alive by
        // `self.direct`, and `&mut self` keeps every other call out while we read).
        let (at, room) = (unsafe { d.data.add(d.filled) } as usize, d.len - d.filled);
        let read = py.detach(move || {
            // SAFETY: `fd` is the caller's open descriptor, borrowed (ManuallyDrop: never
            // closed here); the slice is the unwritten part of the chunk (see above).
            let mut file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
            let buf = unsafe { std::slice::from_raw_parts_mut(at as *mut u8, room) };
            loop {
                match file.read(buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    other => return other,
                }
            }
        });
        let n = read?; // io::Error -> OSError (WouldBlock -> BlockingIOError)
        let out = PyList::empty(py);
        if let Some(d) = self.direct.as_mut() {
            d.filled += n;
        }
        let result = self.finish_direct(py, &out);
        self.poison_on(py, result)?;
        Ok((n, out))
    }

    /// Bytes held for an incomplete frame.
    #[getter]
    fn buffered(&self) -> usize {
        self.inner.buffered() + self.direct.as_ref().map_or(0, |d| d.filled)
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
    stream_tuple(py, t, flags, id, value, body)
}

/// `(type, flags, stream_id, seq_or_consumed, chunk_or_None)`, what `feed` hands out for a
/// stream frame.
fn stream_tuple<'py>(py: Python<'py>, t: u8, flags: u8, id: &str, value: u64,
                     body: Bound<'py, PyAny>) -> PyResult<Bound<'py, PyTuple>> {
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
