//! nerve-core: the sans-I/O core of nerve. Framing, stream flow control and the codec hot
//! path as plain state machines; `python` (feature-gated) is the pyo3 face, `nerve._core`.

pub mod flow;
pub mod frame;
pub mod stream_codec;

#[cfg(feature = "python")]
mod python;
