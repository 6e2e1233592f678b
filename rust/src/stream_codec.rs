//! Binary headers of nerve's stream frames (native TCP only). Chunk bytes follow the
//! header untouched: no serialization of chunk data.
//!
//! STREAM_DATA payload:   flags:u8 | id_len:u8 | id (utf-8) | seq:u64 BE | chunk bytes
//! STREAM_CREDIT payload: flags:u8 | id_len:u8 | id (utf-8) | consumed:u64 BE
//!
//! `id` is the call's request id (at most 255 bytes). For STREAM_CREDIT the u64 is the
//! total number of bytes the receiver's consumer has read so far (absolute, so duplicated
//! or stale grants are harmless).

use std::fmt;

/// The frame belongs to the call's response stream (otherwise its request stream).
pub const FLAG_RESPONSE: u8 = 0x01;
/// STREAM_DATA: the stream ends here (body empty). STREAM_CREDIT: the consumer stopped reading.
pub const FLAG_END: u8 = 0x02;
/// STREAM_DATA: the stream failed; the body is the serialized error.
pub const FLAG_ERROR: u8 = 0x04;

pub const MAX_ID_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamCodecError {
    Truncated { length: usize, needed: usize },
    IdTooLong { length: usize },
    IdNotUtf8,
}

impl fmt::Display for StreamCodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamCodecError::Truncated { length, needed } => write!(
                f,
                "stream frame payload of {length} bytes is shorter than its header ({needed} bytes)"
            ),
            StreamCodecError::IdTooLong { length } => {
                write!(f, "stream id of {length} bytes is longer than {MAX_ID_LEN}")
            }
            StreamCodecError::IdNotUtf8 => write!(f, "stream id is not valid utf-8"),
        }
    }
}

impl std::error::Error for StreamCodecError {}

pub fn header_len(id: &str) -> usize {
    2 + id.len() + 8
}

/// Append a stream header (flags, id, u64) to `out`.
pub fn write_header(out: &mut Vec<u8>, flags: u8, id: &str, value: u64) -> Result<(), StreamCodecError> {
    if id.len() > MAX_ID_LEN {
        return Err(StreamCodecError::IdTooLong { length: id.len() });
    }
    out.push(flags);
    out.push(id.len() as u8);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&value.to_be_bytes());
    Ok(())
}

/// The length of the stream header that starts `payload`, once its first two bytes (flags,
/// id length) are in.
pub fn header_len_in(payload: &[u8]) -> Option<usize> {
    payload.get(1).map(|&id_len| 2 + id_len as usize + 8)
}

/// Parse a stream header; returns (flags, id, value, offset of the body).
pub fn read_header(payload: &[u8]) -> Result<(u8, &str, u64, usize), StreamCodecError> {
    let Some(end) = header_len_in(payload) else {
        return Err(StreamCodecError::Truncated {
            length: payload.len(),
            needed: 10,
        });
    };
    let id_len = end - 10;
    if payload.len() < end {
        return Err(StreamCodecError::Truncated {
            length: payload.len(),
            needed: end,
        });
    }
    let id = std::str::from_utf8(&payload[2..2 + id_len]).map_err(|_| StreamCodecError::IdNotUtf8)?;
    let mut v = [0u8; 8];
    v.copy_from_slice(&payload[2 + id_len..end]);
    Ok((payload[0], id, u64::from_be_bytes(v), end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut out = Vec::new();
        write_header(&mut out, FLAG_RESPONSE | FLAG_END, "abc-é", 1 << 40).unwrap();
        out.extend_from_slice(b"body");
        let (flags, id, v, off) = read_header(&out).unwrap();
        assert_eq!((flags, id, v), (FLAG_RESPONSE | FLAG_END, "abc-é", 1 << 40));
        assert_eq!(&out[off..], b"body");
        assert_eq!(off, header_len("abc-é"));
    }

    #[test]
    fn truncated_and_bad_ids_are_errors() {
        assert!(read_header(&[]).is_err());
        assert!(read_header(&[0, 5, b'a']).is_err());
        assert_eq!(read_header(&[0, 1, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]), Err(StreamCodecError::IdNotUtf8));
        let long = "x".repeat(256);
        assert!(write_header(&mut Vec::new(), 0, &long, 0).is_err());
    }
}
