//! Length-prefixed frames: Moleculer TCP's 6-byte header, a coalescing encoder and a
//! decoder fed with arbitrary slices of the byte stream. No I/O, no Python.
//!
//! Header (6 bytes):
//!   byte 0     XOR of bytes 1..=5 (checksum)
//!   bytes 1..4 big-endian u32 total frame length, header included
//!   byte 5     frame type (see [`FrameType`])
//!
//! The decoder validates a header as soon as its 6 bytes are in, before it buffers or
//! reserves anything for the payload, so a hostile length never costs memory.

use std::fmt;

pub const HEADER_LEN: usize = 6;
/// Default upper bound on one frame, header included (8 MiB).
pub const DEFAULT_MAX_FRAME_SIZE: usize = 8 * 1024 * 1024;

/// Frame types. 1..=8 are Moleculer's TCP ids; 16.. are nerve's own and never sent to a
/// Moleculer node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    Event = 1,
    Request = 2,
    Response = 3,
    Ping = 4,
    Pong = 5,
    GossipRequest = 6,
    GossipResponse = 7,
    GossipHello = 8,
    Hello = 16,
    Discover = 17,
    Info = 18,
    Heartbeat = 19,
    Disconnect = 20,
    StreamData = 21,
    StreamCredit = 22,
    HelloAck = 23,
    Peers = 24,
    Cancel = 25,
}

impl FrameType {
    pub const ALL: [FrameType; 18] = [
        FrameType::Event,
        FrameType::Request,
        FrameType::Response,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::GossipRequest,
        FrameType::GossipResponse,
        FrameType::GossipHello,
        FrameType::Hello,
        FrameType::Discover,
        FrameType::Info,
        FrameType::Heartbeat,
        FrameType::Disconnect,
        FrameType::StreamData,
        FrameType::StreamCredit,
        FrameType::HelloAck,
        FrameType::Peers,
        FrameType::Cancel,
    ];

    pub fn from_u8(value: u8) -> Option<FrameType> {
        FrameType::ALL.iter().copied().find(|t| *t as u8 == value)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    BadChecksum { expected: u8, found: u8 },
    LengthBelowHeader { length: u32 },
    LengthAboveMaximum { length: u32, maximum: usize },
    UnknownType { type_id: u8 },
    PayloadTooLarge { length: usize, maximum: usize },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadChecksum { expected, found } => write!(
                f,
                "bad frame header checksum: expected 0x{expected:02x}, found 0x{found:02x}"
            ),
            FrameError::LengthBelowHeader { length } => write!(
                f,
                "frame length {length} is below the header size {HEADER_LEN}"
            ),
            FrameError::LengthAboveMaximum { length, maximum } => write!(
                f,
                "frame length {length} is above the maximum frame size {maximum}"
            ),
            FrameError::UnknownType { type_id } => write!(f, "unknown frame type {type_id}"),
            FrameError::PayloadTooLarge { length, maximum } => write!(
                f,
                "payload of {length} bytes does not fit in a frame of at most {maximum} bytes"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

impl FrameError {
    /// Short machine-readable reason, carried to Python as `FrameError.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::BadChecksum { .. } => "bad_checksum",
            FrameError::LengthBelowHeader { .. } => "length_below_header",
            FrameError::LengthAboveMaximum { .. } => "length_above_maximum",
            FrameError::UnknownType { .. } => "unknown_type",
            FrameError::PayloadTooLarge { .. } => "payload_too_large",
        }
    }
}

/// The 6 header bytes of a frame carrying `payload_len` bytes.
pub fn header(type_id: u8, payload_len: usize) -> [u8; HEADER_LEN] {
    let total = (payload_len + HEADER_LEN) as u32;
    let len = total.to_be_bytes();
    let crc = len[0] ^ len[1] ^ len[2] ^ len[3] ^ type_id;
    [crc, len[0], len[1], len[2], len[3], type_id]
}

/// Validate a complete 6-byte header; returns (type, total length).
pub fn parse_header(h: &[u8], max_frame_size: usize) -> Result<(u8, usize), FrameError> {
    debug_assert!(h.len() >= HEADER_LEN);
    let expected = h[1] ^ h[2] ^ h[3] ^ h[4] ^ h[5];
    if expected != h[0] {
        return Err(FrameError::BadChecksum {
            expected,
            found: h[0],
        });
    }
    let length = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    if (length as usize) < HEADER_LEN {
        return Err(FrameError::LengthBelowHeader { length });
    }
    if length as usize > max_frame_size {
        return Err(FrameError::LengthAboveMaximum {
            length,
            maximum: max_frame_size,
        });
    }
    let type_id = h[5];
    if FrameType::from_u8(type_id).is_none() {
        return Err(FrameError::UnknownType { type_id });
    }
    Ok((type_id, length as usize))
}

/// Append one whole frame to `out`.
pub fn encode_into(out: &mut Vec<u8>, type_id: u8, payload: &[u8]) {
    out.extend_from_slice(&header(type_id, payload.len()));
    out.extend_from_slice(payload);
}

/// Incremental frame decoder.
///
/// Bytes that do not yet make a whole frame are kept in `pending`; whole frames inside a
/// fed slice are handed out as sub-slices of that slice, never copied into `pending`.
/// After an error the decoder is poisoned: every later `feed` returns the same error.
#[derive(Debug)]
pub struct Decoder {
    max_frame_size: usize,
    pending: Vec<u8>,
    /// Type and total length of the frame in `pending`, once its header is validated.
    current: Option<(u8, usize)>,
    error: Option<FrameError>,
}

impl Decoder {
    pub fn new(max_frame_size: usize) -> Decoder {
        Decoder {
            max_frame_size,
            pending: Vec::new(),
            current: None,
            error: None,
        }
    }

    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }

    /// Bytes held back for an incomplete frame.
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    pub fn error(&self) -> Option<&FrameError> {
        self.error.as_ref()
    }

    /// Feed bytes; `emit(type, payload)` is called for each complete frame, in order.
    pub fn feed<F>(&mut self, data: &[u8], emit: F) -> Result<(), FrameError>
    where
        F: FnMut(u8, &[u8]),
    {
        self.feed_divert(data, emit, |_, _, _| false).map(|_| ())
    }

    /// Like [`Decoder::feed`], but a frame that starts in `data` (not in `pending`) and is
    /// incomplete there may be handed to the caller instead of being buffered: `divert(type,
    /// total, available)` is asked, with `available` the frame's bytes present (header
    /// validated, `available.len() < total`), and if it says yes, feeding stops and
    /// `Ok(Some((offset, total)))` gives where that frame starts in `data` and its length
    /// (header included). The caller then owns the
    /// rest of that frame (the next `total - available.len()` bytes of the byte stream), and
    /// the decoder is between frames. `Ok(None)`: all of `data` was taken.
    ///
    /// This is how a large frame's body is received straight into its own buffer instead
    /// of being gathered in `pending` and copied out.
    pub fn feed_divert<F, D>(&mut self, mut data: &[u8], mut emit: F, mut divert: D) -> Result<Option<(usize, usize)>, FrameError>
    where
        F: FnMut(u8, &[u8]),
        D: FnMut(u8, usize, &[u8]) -> bool,
    {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let start_len = data.len();
        // First finish the frame that an earlier call left incomplete.
        if !self.pending.is_empty() {
            if self.current.is_none() {
                let need = HEADER_LEN - self.pending.len();
                let take = need.min(data.len());
                self.pending.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.pending.len() < HEADER_LEN {
                    return Ok(None);
                }
                let parsed = self.check(&self.pending[..HEADER_LEN].to_owned())?;
                self.current = Some(parsed);
                self.pending.reserve_exact(parsed.1 - HEADER_LEN);
            }
            let (type_id, total) = self.current.expect("header parsed");
            let take = (total - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() < total {
                return Ok(None);
            }
            emit(type_id, &self.pending[HEADER_LEN..]);
            self.pending = Vec::new();
            self.current = None;
        }
        // Then whole frames straight out of `data`.
        while data.len() >= HEADER_LEN {
            let (type_id, total) = self.check(&data[..HEADER_LEN])?;
            if data.len() < total {
                if divert(type_id, total, data) {
                    return Ok(Some((start_len - data.len(), total)));
                }
                self.current = Some((type_id, total));
                self.pending.reserve_exact(total);
                self.pending.extend_from_slice(data);
                return Ok(None);
            }
            emit(type_id, &data[HEADER_LEN..total]);
            data = &data[total..];
        }
        // Keep the tail (shorter than a header).
        self.pending.extend_from_slice(data);
        Ok(None)
    }

    fn check(&mut self, h: &[u8]) -> Result<(u8, usize), FrameError> {
        parse_header(h, self.max_frame_size).inspect_err(|e| {
            self.error = Some(e.clone());
            self.pending = Vec::new();
            self.current = None;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(d: &mut Decoder, data: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, FrameError> {
        let mut out = Vec::new();
        d.feed(data, |t, p| out.push((t, p.to_vec())))?;
        Ok(out)
    }

    #[test]
    fn round_trip_and_every_split() {
        let mut wire = Vec::new();
        let input: Vec<(u8, Vec<u8>)> = vec![
            (2, b"hello".to_vec()),
            (3, vec![]),
            (21, vec![7u8; 300]),
            (1, b"x".to_vec()),
        ];
        for (t, p) in &input {
            encode_into(&mut wire, *t, p);
        }
        for cut in 0..=wire.len() {
            for cut2 in cut..=wire.len() {
                let mut d = Decoder::new(1024);
                let mut out = frames(&mut d, &wire[..cut]).unwrap();
                out.extend(frames(&mut d, &wire[cut..cut2]).unwrap());
                out.extend(frames(&mut d, &wire[cut2..]).unwrap());
                assert_eq!(out, input, "cuts at {cut}, {cut2}");
                assert_eq!(d.buffered(), 0);
            }
        }
    }

    #[test]
    fn header_matches_moleculer_layout() {
        let h = header(2, 10);
        assert_eq!(&h[1..5], &16u32.to_be_bytes());
        assert_eq!(h[5], 2);
        assert_eq!(h[0], h[1] ^ h[2] ^ h[3] ^ h[4] ^ h[5]);
    }

    #[test]
    fn errors_are_raised_on_the_header_alone() {
        let mut d = Decoder::new(100);
        let mut h = header(2, 1000);
        assert_eq!(
            frames(&mut d, &h).unwrap_err(),
            FrameError::LengthAboveMaximum {
                length: 1006,
                maximum: 100
            }
        );
        // poisoned
        assert!(frames(&mut d, b"").is_err());

        let mut d = Decoder::new(100);
        h = header(2, 1);
        h[0] ^= 0xff;
        assert!(matches!(
            frames(&mut d, &h[..3]).and_then(|_| frames(&mut d, &h[3..])),
            Err(FrameError::BadChecksum { .. })
        ));

        let mut d = Decoder::new(100);
        let h = header(99, 1);
        assert_eq!(
            frames(&mut d, &h).unwrap_err(),
            FrameError::UnknownType { type_id: 99 }
        );

        let mut d = Decoder::new(100);
        let mut h = [0u8, 0, 0, 0, 3, 2];
        h[0] = h[1] ^ h[2] ^ h[3] ^ h[4] ^ h[5];
        assert_eq!(
            frames(&mut d, &h).unwrap_err(),
            FrameError::LengthBelowHeader { length: 3 }
        );
    }

    #[test]
    fn rejected_length_allocates_nothing() {
        let h = header(21, (u32::MAX as usize) - HEADER_LEN);
        let mut d = Decoder::new(1 << 20);
        assert!(frames(&mut d, &h).is_err());
        assert_eq!(d.pending.capacity(), 0);
    }

    #[test]
    fn divert_hands_over_incomplete_frames_only() {
        let mut wire = Vec::new();
        encode_into(&mut wire, 2, b"small");
        encode_into(&mut wire, 21, &[9u8; 100]);
        encode_into(&mut wire, 1, b"after");
        let big_at = HEADER_LEN + 5;
        for cut in 0..=wire.len() {
            let mut d = Decoder::new(1024);
            let mut out: Vec<(u8, Vec<u8>)> = Vec::new();
            let mut asked = Vec::new();
            let r = d
                .feed_divert(&wire[..cut], |t, p| out.push((t, p.to_vec())), |t, total, avail| {
                    asked.push((t, total, avail.len()));
                    t == 21
                })
                .unwrap();
            if cut > big_at + HEADER_LEN && cut < big_at + HEADER_LEN + 100 || cut == big_at + HEADER_LEN {
                // the big frame's header is in and its body is not complete: handed over
                assert_eq!(r, Some((big_at, HEADER_LEN + 100)), "cut {cut}");
                assert_eq!(asked, vec![(21, HEADER_LEN + 100, cut - big_at)]);
                assert_eq!(d.buffered(), 0);
                // the caller takes the rest of the big frame; the decoder goes on after it
                let rest = &wire[big_at + HEADER_LEN + 100..];
                d.feed(rest, |t, p| out.push((t, p.to_vec()))).unwrap();
                assert_eq!(out, vec![(2, b"small".to_vec()), (1, b"after".to_vec())]);
            } else {
                assert_eq!(r, None, "cut {cut}");
                d.feed(&wire[cut..], |t, p| out.push((t, p.to_vec()))).unwrap();
                assert_eq!(out.len(), 3, "cut {cut}");
            }
        }
    }
}
