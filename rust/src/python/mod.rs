//! The pyo3 face of the core: `nerve._core`. Rust errors become Python exceptions of the
//! `nerve.errors` tree here, at the boundary.

mod errors;
mod flow;
mod frames;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
mod _core {
    #[pymodule_export]
    use super::flow::{CreditSender, StreamReceiver};
    #[pymodule_export]
    use super::frames::{decode_stream_header, encode_frame, FrameDecoder, FrameEncoder};

    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        use crate::frame::{FrameType, DEFAULT_MAX_FRAME_SIZE, HEADER_LEN};
        use crate::stream_codec::{FLAG_END, FLAG_ERROR, FLAG_RESPONSE};
        m.add("HEADER_LEN", HEADER_LEN)?;
        m.add("DEFAULT_MAX_FRAME_SIZE", DEFAULT_MAX_FRAME_SIZE)?;
        m.add("STREAM_FLAG_RESPONSE", FLAG_RESPONSE)?;
        m.add("STREAM_FLAG_END", FLAG_END)?;
        m.add("STREAM_FLAG_ERROR", FLAG_ERROR)?;
        let types = pyo3::types::PyDict::new(m.py());
        for t in FrameType::ALL {
            types.set_item(format!("{t:?}"), t as u8)?;
        }
        m.add("FRAME_TYPES", types)?;
        Ok(())
    }
}
