//! Raising the Python exceptions of `nerve.errors` from Rust errors.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use crate::flow::FlowError;
use crate::frame::FrameError;
use crate::stream_codec::StreamCodecError;

static FRAME_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static FLOW_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn raise(cell: &'static PyOnceLock<Py<PyType>>, name: &str, message: String, reason: &str) -> PyErr {
    Python::attach(|py| match cell.import(py, "nerve.errors", name) {
        Ok(cls) => match cls.call1((message, reason)) {
            Ok(exc) => PyErr::from_value(exc),
            Err(e) => e,
        },
        Err(e) => e,
    })
}

pub fn frame_error(e: &FrameError) -> PyErr {
    raise(&FRAME_ERROR, "FrameError", e.to_string(), e.reason())
}

/// A fresh `FrameError(message, reason)` (a poisoned decoder raises its error again this way:
/// keeping the first exception object would keep its traceback, and with it the reader's
/// frame and the decoder itself, in a cycle the garbage collector cannot see through).
pub fn frame_error_again(message: &str, reason: &str) -> PyErr {
    raise(&FRAME_ERROR, "FrameError", message.to_owned(), reason)
}

pub fn stream_codec_error(e: &StreamCodecError) -> PyErr {
    raise(&FRAME_ERROR, "FrameError", e.to_string(), "bad_stream_header")
}

pub fn flow_error(e: &FlowError) -> PyErr {
    raise(&FLOW_ERROR, "FlowError", e.to_string(), e.reason())
}
