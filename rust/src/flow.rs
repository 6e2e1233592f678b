//! Per-stream credit-based flow control, sans-I/O: `CreditSender` keeps a producer within
//! the window its peer granted, `StreamReceiver` reorders, bounds and hands out the chunks.
//! Grants are absolute (`consumed` = total bytes read), so stale or repeated grants are harmless.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

/// Anything with a length in bytes that a stream can carry as one chunk.
pub trait Chunk {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Chunk for Vec<u8> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
}

impl Chunk for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
}

impl Chunk for Box<[u8]> {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowError {
    /// A constructor argument is out of range.
    InvalidConfig {
        field: &'static str,
        got: i128,
        min: u64,
        max: u64,
    },
    /// The sender tried to send more than its credit allows.
    CreditExceeded {
        len: usize,
        credit: u64,
    },
    /// A received chunk would make the unread bytes exceed the window.
    WindowExceeded {
        seq: u64,
        len: usize,
        buffered: u64,
        window: u64,
    },
    ChunkTooLarge {
        len: usize,
        max_chunk: usize,
    },
    EmptyChunk {
        seq: u64,
    },
    /// `on_sent` after `close`.
    Closed,
    /// The peer claims its consumer read bytes that were never sent.
    CreditBeyondSent {
        consumed: u64,
        sent: u64,
    },
    Duplicate {
        seq: u64,
    },
    /// A data chunk at or after the end marker.
    AfterEnd {
        seq: u64,
        end: u64,
    },
    /// Too many chunks parked out of order.
    ReorderOverflow {
        seq: u64,
        next_seq: u64,
        max_reorder: usize,
    },
    /// A second end marker at a different seq.
    DuplicateEnd {
        seq: u64,
        end: u64,
    },
}

impl FlowError {
    /// Short machine-readable reason, carried to Python as `FlowError.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            FlowError::InvalidConfig { .. } => "invalid_config",
            FlowError::CreditExceeded { .. } | FlowError::WindowExceeded { .. } => {
                "window_exceeded"
            }
            FlowError::ChunkTooLarge { .. } => "chunk_too_large",
            FlowError::EmptyChunk { .. } => "empty_chunk",
            FlowError::Closed => "closed",
            FlowError::CreditBeyondSent { .. } => "credit_beyond_sent",
            FlowError::Duplicate { .. } => "duplicate",
            FlowError::AfterEnd { .. } => "after_end",
            FlowError::ReorderOverflow { .. } => "reorder_overflow",
            FlowError::DuplicateEnd { .. } => "duplicate_end",
        }
    }
}

impl fmt::Display for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlowError::InvalidConfig { field, got, min, max } => write!(
                f,
                "invalid flow control setting: {field} must be between {min} and {max}, got {got}"
            ),
            FlowError::CreditExceeded { len, credit } => write!(
                f,
                "cannot send a chunk of {len} bytes with only {credit} bytes of credit left in the window"
            ),
            FlowError::WindowExceeded { seq, len, buffered, window } => write!(
                f,
                "stream chunk {seq} of {len} bytes exceeds the window: {buffered} bytes already \
                 buffered, window is {window} bytes"
            ),
            FlowError::ChunkTooLarge { len, max_chunk } => write!(
                f,
                "stream chunk of {len} bytes is larger than the maximum chunk size of {max_chunk} bytes"
            ),
            FlowError::EmptyChunk { seq } => write!(f, "stream chunk {seq} is empty"),
            FlowError::Closed => write!(f, "cannot send on a stream that is already closed"),
            FlowError::CreditBeyondSent { consumed, sent } => write!(
                f,
                "peer granted credit for {consumed} bytes consumed but only {sent} bytes were sent"
            ),
            FlowError::Duplicate { seq } => write!(f, "stream chunk {seq} was already received"),
            FlowError::AfterEnd { seq, end } => write!(
                f,
                "stream chunk {seq} comes at or after the end of the stream (end marker at {end})"
            ),
            FlowError::ReorderOverflow { seq, next_seq, max_reorder } => write!(
                f,
                "stream chunk {seq} arrived while chunk {next_seq} is still missing and {max_reorder} \
                 chunks are already waiting out of order"
            ),
            FlowError::DuplicateEnd { seq, end } => write!(
                f,
                "second end marker at {seq} for a stream that already ends at {end}"
            ),
        }
    }
}

impl std::error::Error for FlowError {}

fn check(field: &'static str, got: u64, min: u64) -> Result<(), FlowError> {
    if got < min {
        return Err(FlowError::InvalidConfig {
            field,
            got: got as i128,
            min,
            max: u64::MAX,
        });
    }
    Ok(())
}

/// The producer's side: how much it may send, given the peer's absolute grants.
#[derive(Debug, Clone)]
pub struct CreditSender {
    window: u64,
    max_chunk: usize,
    sent: u64,
    consumed: u64,
    next_seq: u64,
    closed: bool,
}

impl CreditSender {
    pub fn new(window: u64, max_chunk: usize) -> Result<Self, FlowError> {
        check("window", window, 1)?;
        check("max_chunk", max_chunk as u64, 1)?;
        Ok(CreditSender {
            window,
            max_chunk,
            sent: 0,
            consumed: 0,
            next_seq: 0,
            closed: false,
        })
    }

    /// Bytes that may be sent now: `consumed + window - sent`.
    pub fn credit(&self) -> u64 {
        // consumed <= sent always (on_credit refuses more), so nothing here can overflow.
        self.window.saturating_sub(self.sent - self.consumed)
    }

    /// Size of the next chunk for `want` bytes of data: min(want, max_chunk, credit); 0 once closed.
    pub fn next_chunk_len(&self, want: usize) -> usize {
        if self.closed {
            return 0;
        }
        let credit = usize::try_from(self.credit()).unwrap_or(usize::MAX);
        want.min(self.max_chunk).min(credit)
    }

    /// Record a chunk of `n` bytes as sent; returns its seq.
    pub fn on_sent(&mut self, n: usize) -> Result<u64, FlowError> {
        if self.closed {
            return Err(FlowError::Closed);
        }
        if n == 0 {
            return Err(FlowError::EmptyChunk { seq: self.next_seq });
        }
        if n > self.max_chunk {
            return Err(FlowError::ChunkTooLarge {
                len: n,
                max_chunk: self.max_chunk,
            });
        }
        let credit = self.credit();
        if n as u64 > credit {
            return Err(FlowError::CreditExceeded { len: n, credit });
        }
        self.sent += n as u64;
        let seq = self.next_seq;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Apply an absolute grant; true if the credit grew. Stale grants are ignored.
    pub fn on_credit(&mut self, consumed_total: u64) -> Result<bool, FlowError> {
        if consumed_total > self.sent {
            return Err(FlowError::CreditBeyondSent {
                consumed: consumed_total,
                sent: self.sent,
            });
        }
        if consumed_total <= self.consumed {
            return Ok(false);
        }
        self.consumed = consumed_total;
        Ok(true)
    }

    /// Mark the end of the stream; returns the seq of the end marker (chunks sent so far).
    pub fn close(&mut self) -> u64 {
        self.closed = true;
        self.next_seq
    }

    pub fn window(&self) -> u64 {
        self.window
    }
    pub fn max_chunk(&self) -> usize {
        self.max_chunk
    }
    pub fn sent(&self) -> u64 {
        self.sent
    }
    pub fn consumed(&self) -> u64 {
        self.consumed
    }
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
    pub fn closed(&self) -> bool {
        self.closed
    }
}

/// The consumer's side: accepts chunks in any order within the window, hands them out in
/// seq order and decides when to grant credit. The first error is sticky.
#[derive(Debug)]
pub struct StreamReceiver<C: Chunk> {
    window: u64,
    max_chunk: usize,
    max_reorder: usize,
    grant_threshold: u64,
    next_seq: u64,
    ready: VecDeque<C>,
    parked: BTreeMap<u64, C>,
    buffered: u64,
    received: u64,
    consumed: u64,
    last_granted: u64,
    end: Option<u64>,
    failed: Option<FlowError>,
}

impl<C: Chunk> StreamReceiver<C> {
    pub fn new(
        window: u64,
        max_chunk: usize,
        max_reorder: usize,
        first_seq: u64,
    ) -> Result<Self, FlowError> {
        check("window", window, 1)?;
        check("max_chunk", max_chunk as u64, 1)?;
        Ok(StreamReceiver {
            window,
            max_chunk,
            max_reorder,
            grant_threshold: (window / 4).max(1),
            next_seq: first_seq,
            ready: VecDeque::new(),
            parked: BTreeMap::new(),
            buffered: 0,
            received: 0,
            consumed: 0,
            last_granted: 0,
            end: None,
            failed: None,
        })
    }

    fn fail<T>(&mut self, e: FlowError) -> Result<T, FlowError> {
        self.failed = Some(e.clone());
        Err(e)
    }

    fn sticky(&self) -> Result<(), FlowError> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Accept data chunk `seq`.
    pub fn push(&mut self, seq: u64, chunk: C) -> Result<(), FlowError> {
        self.sticky()?;
        let len = chunk.len();
        if len > self.max_chunk {
            return self.fail(FlowError::ChunkTooLarge {
                len,
                max_chunk: self.max_chunk,
            });
        }
        if len == 0 {
            return self.fail(FlowError::EmptyChunk { seq });
        }
        if seq < self.next_seq || self.parked.contains_key(&seq) {
            return self.fail(FlowError::Duplicate { seq });
        }
        // Without an end marker the seq space itself ends at u64::MAX, so next_seq never wraps.
        let end = self.end.unwrap_or(u64::MAX);
        if seq >= end {
            return self.fail(FlowError::AfterEnd { seq, end });
        }
        if self.buffered.saturating_add(len as u64) > self.window {
            return self.fail(FlowError::WindowExceeded {
                seq,
                len,
                buffered: self.buffered,
                window: self.window,
            });
        }
        if seq == self.next_seq {
            self.ready.push_back(chunk);
            self.next_seq += 1;
            while let Some(next) = self.parked.remove(&self.next_seq) {
                self.ready.push_back(next);
                self.next_seq += 1;
            }
        } else {
            if self.parked.len() >= self.max_reorder {
                return self.fail(FlowError::ReorderOverflow {
                    seq,
                    next_seq: self.next_seq,
                    max_reorder: self.max_reorder,
                });
            }
            self.parked.insert(seq, chunk);
        }
        self.buffered += len as u64;
        self.received = self.received.saturating_add(len as u64);
        Ok(())
    }

    /// Accept the end marker at `seq` (the seq after the last data chunk). Repeating the
    /// same end is harmless.
    pub fn push_end(&mut self, seq: u64) -> Result<(), FlowError> {
        self.sticky()?;
        if let Some(end) = self.end {
            if end == seq {
                return Ok(());
            }
            return self.fail(FlowError::DuplicateEnd { seq, end });
        }
        if self.next_seq > seq {
            // Chunks seq..next_seq were already received in order.
            return self.fail(FlowError::AfterEnd {
                seq: self.next_seq - 1,
                end: seq,
            });
        }
        if let Some((&last, _)) = self.parked.range(seq..).next_back() {
            return self.fail(FlowError::AfterEnd {
                seq: last,
                end: seq,
            });
        }
        self.end = Some(seq);
        Ok(())
    }

    /// The next chunk in seq order, if it has arrived; its bytes count as consumed.
    pub fn pop(&mut self) -> Result<Option<C>, FlowError> {
        self.sticky()?;
        let chunk = self.ready.pop_front();
        if let Some(c) = &chunk {
            let len = c.len() as u64;
            self.buffered -= len;
            self.consumed += len;
        }
        Ok(chunk)
    }

    /// `Some(consumed)` once the consumer has read at least a quarter window since the
    /// last grant; the caller sends it to the peer. None after a failure.
    pub fn take_grant(&mut self) -> Option<u64> {
        if self.failed.is_some() || self.consumed - self.last_granted < self.grant_threshold {
            return None;
        }
        self.last_granted = self.consumed;
        Some(self.consumed)
    }

    /// `Some(consumed)` if anything was read since the last grant, however little.
    pub fn force_grant(&mut self) -> Option<u64> {
        if self.failed.is_some() || self.consumed <= self.last_granted {
            return None;
        }
        self.last_granted = self.consumed;
        Some(self.consumed)
    }

    /// The first missing seq when something after it has arrived (a parked chunk or the end
    /// marker), else None.
    pub fn missing(&self) -> Option<u64> {
        let gap = !self.parked.is_empty() || self.end.is_some_and(|end| end > self.next_seq);
        gap.then_some(self.next_seq)
    }

    /// The end marker was seen and every chunk before it popped.
    pub fn is_finished(&self) -> bool {
        self.failed.is_none() && self.end == Some(self.next_seq) && self.ready.is_empty()
    }

    /// Bytes received but not yet popped (ready + parked).
    pub fn buffered_bytes(&self) -> u64 {
        self.buffered
    }
    pub fn received(&self) -> u64 {
        self.received
    }
    pub fn consumed(&self) -> u64 {
        self.consumed
    }
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
    /// Number of chunks waiting out of order.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }
    pub fn window(&self) -> u64 {
        self.window
    }
    pub fn max_chunk(&self) -> usize {
        self.max_chunk
    }
    pub fn max_reorder(&self) -> usize {
        self.max_reorder
    }
    pub fn end_seq(&self) -> Option<u64> {
        self.end
    }
    pub fn last_granted(&self) -> u64 {
        self.last_granted
    }
    /// The sticky error, once the receiver has failed.
    pub fn failed(&self) -> Option<&FlowError> {
        self.failed.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Rx = StreamReceiver<Vec<u8>>;

    fn rx(window: u64, max_chunk: usize, max_reorder: usize) -> Rx {
        StreamReceiver::new(window, max_chunk, max_reorder, 0).unwrap()
    }

    fn reason<T: fmt::Debug>(r: Result<T, FlowError>) -> &'static str {
        r.unwrap_err().reason()
    }

    /// xorshift64*, enough to shuffle deliveries reproducibly.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn invalid_config() {
        assert_eq!(reason(CreditSender::new(0, 1)), "invalid_config");
        assert_eq!(reason(CreditSender::new(1, 0)), "invalid_config");
        assert_eq!(reason(Rx::new(0, 1, 0, 0)), "invalid_config");
        assert_eq!(reason(Rx::new(1, 0, 0, 0)), "invalid_config");
        let e = CreditSender::new(0, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "invalid flow control setting: window must be between 1 and {}, got 0",
                u64::MAX
            )
        );
        assert!(Rx::new(1, 1, 0, 7).is_ok());
    }

    #[test]
    fn sender_credit_and_seqs() {
        let mut s = CreditSender::new(10, 4).unwrap();
        assert_eq!(s.credit(), 10);
        assert_eq!(s.next_chunk_len(100), 4);
        assert_eq!(s.next_chunk_len(3), 3);
        assert_eq!(s.on_sent(4).unwrap(), 0);
        assert_eq!(s.on_sent(4).unwrap(), 1);
        assert_eq!(s.credit(), 2);
        assert_eq!(s.next_chunk_len(100), 2);
        assert_eq!(s.on_sent(2).unwrap(), 2);
        assert_eq!(s.credit(), 0);
        assert_eq!(s.next_chunk_len(100), 0);
        assert_eq!(s.on_credit(5), Ok(true));
        assert_eq!(s.credit(), 5);
        assert_eq!(s.on_credit(3), Ok(false), "stale grant");
        assert_eq!(s.on_credit(5), Ok(false), "repeated grant");
        assert_eq!(s.consumed(), 5);
        assert_eq!(
            (s.sent(), s.next_seq(), s.window(), s.max_chunk()),
            (10, 3, 10, 4)
        );
        assert!(!s.closed());
        assert_eq!(s.close(), 3);
        assert!(s.closed());
        assert_eq!(s.close(), 3);
        assert_eq!(s.next_chunk_len(100), 0);
    }

    #[test]
    fn sender_errors() {
        let mut s = CreditSender::new(10, 4).unwrap();
        assert_eq!(reason(s.on_sent(0)), "empty_chunk");
        assert_eq!(reason(s.on_sent(5)), "chunk_too_large");
        s.on_sent(4).unwrap();
        s.on_sent(4).unwrap();
        let e = s.on_sent(3).unwrap_err();
        assert_eq!(e, FlowError::CreditExceeded { len: 3, credit: 2 });
        assert_eq!(e.reason(), "window_exceeded");
        assert_eq!(s.next_seq(), 2, "failed sends take no seq");
        assert_eq!(
            s.on_credit(9),
            Err(FlowError::CreditBeyondSent {
                consumed: 9,
                sent: 8
            })
        );
        assert_eq!(reason(s.on_credit(9)), "credit_beyond_sent");
        assert_eq!(s.on_credit(8), Ok(true));
        s.close();
        assert_eq!(reason(s.on_sent(1)), "closed");
    }

    #[test]
    fn sender_huge_window_does_not_overflow() {
        let mut s = CreditSender::new(u64::MAX, usize::MAX).unwrap();
        assert_eq!(s.credit(), u64::MAX);
        s.on_sent(10).unwrap();
        assert_eq!(s.credit(), u64::MAX - 10);
        s.on_credit(10).unwrap();
        assert_eq!(s.credit(), u64::MAX);
    }

    #[test]
    fn receiver_in_order_and_grants() {
        let mut r = rx(8, 4, 4);
        r.push(0, vec![1, 2, 3]).unwrap();
        r.push(1, vec![4]).unwrap();
        assert_eq!((r.buffered_bytes(), r.received(), r.next_seq()), (4, 4, 2));
        assert_eq!(r.take_grant(), None);
        assert_eq!(r.pop().unwrap(), Some(vec![1, 2, 3]));
        assert_eq!(r.consumed(), 3);
        assert_eq!(r.take_grant(), Some(3), "threshold is window/4 = 2");
        assert_eq!(r.take_grant(), None);
        assert_eq!(r.pop().unwrap(), Some(vec![4]));
        assert_eq!(r.take_grant(), None, "1 byte is below the threshold");
        assert_eq!(r.force_grant(), Some(4));
        assert_eq!(r.force_grant(), None);
        assert_eq!(r.pop().unwrap(), None);
        assert!(!r.is_finished());
        r.push_end(2).unwrap();
        r.push_end(2).unwrap();
        assert!(r.is_finished());
        assert_eq!(r.buffered_bytes(), 0);
    }

    #[test]
    fn receiver_grant_threshold_is_at_least_one() {
        let mut r = rx(3, 3, 0);
        r.push(0, vec![9]).unwrap();
        r.pop().unwrap();
        assert_eq!(r.take_grant(), Some(1));
    }

    #[test]
    fn receiver_reorders_and_reports_gap() {
        let mut r = rx(100, 10, 8);
        r.push(2, vec![3]).unwrap();
        r.push(3, vec![4]).unwrap();
        assert_eq!(r.missing(), Some(0));
        assert_eq!(r.parked(), 2);
        assert_eq!(r.pop().unwrap(), None);
        r.push(0, vec![1]).unwrap();
        assert_eq!(r.missing(), Some(1));
        r.push(1, vec![2]).unwrap();
        assert_eq!(r.missing(), None);
        assert_eq!(r.parked(), 0);
        let got: Vec<_> = std::iter::from_fn(|| r.pop().unwrap()).collect();
        assert_eq!(got, vec![vec![1], vec![2], vec![3], vec![4]]);
    }

    #[test]
    fn end_before_data_is_a_gap() {
        let mut r = rx(100, 10, 8);
        r.push_end(2).unwrap();
        assert_eq!(r.missing(), Some(0));
        r.push(1, vec![1]).unwrap();
        r.push(0, vec![0]).unwrap();
        assert_eq!(r.missing(), None);
        assert!(!r.is_finished());
        r.pop().unwrap();
        r.pop().unwrap();
        assert!(r.is_finished());
    }

    #[test]
    fn first_seq() {
        let mut r = StreamReceiver::new(10, 10, 0, 5).unwrap();
        assert_eq!(reason(r.push(4, vec![1])), "duplicate");
        let mut r = StreamReceiver::new(10, 10, 0, 5).unwrap();
        r.push(5, vec![1]).unwrap();
        assert_eq!(r.next_seq(), 6);
    }

    #[test]
    fn receiver_errors_are_sticky() {
        let mut r = rx(10, 4, 2);
        r.push(0, vec![0]).unwrap();
        let e = r.push(0, vec![0]).unwrap_err();
        assert_eq!(e, FlowError::Duplicate { seq: 0 });
        assert_eq!(e.to_string(), "stream chunk 0 was already received");
        assert_eq!(r.push(1, vec![1]), Err(e.clone()));
        assert_eq!(r.push_end(1), Err(e.clone()));
        assert_eq!(r.pop(), Err(e.clone()));
        assert_eq!(r.failed(), Some(&e));
        assert_eq!(r.force_grant(), None);
        assert!(!r.is_finished());
    }

    #[test]
    fn receiver_each_error() {
        let mut r = rx(10, 4, 2);
        assert_eq!(reason(r.push(0, vec![0; 5])), "chunk_too_large");
        let mut r = rx(10, 4, 2);
        assert_eq!(reason(r.push(0, vec![])), "empty_chunk");

        let mut r = rx(10, 4, 2);
        r.push(1, vec![0]).unwrap();
        assert_eq!(
            r.push(1, vec![0]),
            Err(FlowError::Duplicate { seq: 1 }),
            "parked twice"
        );

        let mut r = rx(10, 4, 2);
        r.push_end(2).unwrap();
        assert_eq!(
            r.push(2, vec![0]),
            Err(FlowError::AfterEnd { seq: 2, end: 2 })
        );
        let mut r = rx(10, 4, 2);
        r.push_end(2).unwrap();
        assert_eq!(reason(r.push(7, vec![0])), "after_end");

        let mut r = rx(10, 4, 2);
        r.push(0, vec![0; 4]).unwrap();
        r.push(2, vec![0; 4]).unwrap();
        let e = r.push(1, vec![0; 3]).unwrap_err();
        assert_eq!(
            e,
            FlowError::WindowExceeded {
                seq: 1,
                len: 3,
                buffered: 8,
                window: 10
            }
        );
        assert_eq!(e.reason(), "window_exceeded");
        assert!(e
            .to_string()
            .contains("8 bytes already buffered, window is 10"));

        let mut r = rx(100, 4, 2);
        r.push(1, vec![0]).unwrap();
        r.push(2, vec![0]).unwrap();
        assert_eq!(reason(r.push(3, vec![0])), "reorder_overflow");
        let mut r = rx(100, 4, 0);
        assert_eq!(reason(r.push(1, vec![0])), "reorder_overflow");

        let mut r = StreamReceiver::new(10, 4, 2, u64::MAX).unwrap();
        assert_eq!(
            r.push(u64::MAX, vec![0]),
            Err(FlowError::AfterEnd {
                seq: u64::MAX,
                end: u64::MAX
            })
        );

        let mut r = rx(10, 4, 2);
        r.push_end(3).unwrap();
        assert_eq!(
            r.push_end(4),
            Err(FlowError::DuplicateEnd { seq: 4, end: 3 })
        );

        let mut r = rx(10, 4, 2);
        r.push(2, vec![0]).unwrap();
        assert_eq!(r.push_end(2), Err(FlowError::AfterEnd { seq: 2, end: 2 }));
        let mut r = rx(10, 4, 2);
        r.push(0, vec![0]).unwrap();
        r.push(1, vec![0]).unwrap();
        assert_eq!(r.push_end(1), Err(FlowError::AfterEnd { seq: 1, end: 1 }));
    }

    #[test]
    fn window_is_exact() {
        let mut r = rx(8, 8, 2);
        r.push(0, vec![0; 8]).unwrap();
        assert_eq!(reason(r.push(1, vec![0])), "window_exceeded");
        let mut r = rx(8, 8, 2);
        r.push(0, vec![0; 8]).unwrap();
        r.pop().unwrap();
        r.push(1, vec![0; 8]).unwrap();
    }

    #[test]
    fn every_error_has_a_snake_case_reason_and_a_sentence() {
        let all = [
            FlowError::InvalidConfig {
                field: "window",
                got: -1,
                min: 1,
                max: 5,
            },
            FlowError::CreditExceeded { len: 1, credit: 0 },
            FlowError::WindowExceeded {
                seq: 0,
                len: 1,
                buffered: 1,
                window: 1,
            },
            FlowError::ChunkTooLarge {
                len: 2,
                max_chunk: 1,
            },
            FlowError::EmptyChunk { seq: 0 },
            FlowError::Closed,
            FlowError::CreditBeyondSent {
                consumed: 2,
                sent: 1,
            },
            FlowError::Duplicate { seq: 3 },
            FlowError::AfterEnd { seq: 3, end: 2 },
            FlowError::ReorderOverflow {
                seq: 3,
                next_seq: 0,
                max_reorder: 1,
            },
            FlowError::DuplicateEnd { seq: 3, end: 2 },
        ];
        for e in all {
            let r = e.reason();
            assert!(r.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{r}");
            assert!(!e.to_string().is_empty());
        }
    }

    /// Sender and receiver wired through a reordering queue; the consumer reads at random.
    #[test]
    fn wired_with_reordering() {
        for seed in 1..200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let window = 1 + rng.below(64) as u64;
            let max_chunk = 1 + rng.below(16);
            let total = rng.below(500);
            let data: Vec<u8> = (0..total).map(|i| i as u8).collect();
            let mut tx = CreditSender::new(window, max_chunk).unwrap();
            let mut r: Rx = StreamReceiver::new(window, max_chunk, window as usize, 0).unwrap();
            let mut link: Vec<(u64, Option<Vec<u8>>)> = Vec::new();
            let mut grants: Vec<u64> = Vec::new();
            let mut at = 0;
            let mut out = Vec::new();
            let mut steps = 0;
            while !r.is_finished() {
                steps += 1;
                assert!(steps < 100_000, "seed {seed}: no progress");
                match rng.below(4) {
                    0 => {
                        let n = tx.next_chunk_len(total - at);
                        if n > 0 {
                            let seq = tx.on_sent(n).unwrap();
                            link.push((seq, Some(data[at..at + n].to_vec())));
                            at += n;
                        } else if at == total && !tx.closed() {
                            link.push((tx.close(), None));
                        }
                    }
                    1 if !link.is_empty() => {
                        let (seq, chunk) = link.swap_remove(rng.below(link.len()));
                        match chunk {
                            Some(c) => r.push(seq, c).unwrap(),
                            None => r.push_end(seq).unwrap(),
                        }
                        assert!(r.buffered_bytes() <= window);
                    }
                    2 => {
                        if let Some(c) = r.pop().unwrap() {
                            out.extend(c);
                        }
                        if let Some(g) = r.take_grant() {
                            grants.push(g);
                        }
                        if rng.below(8) == 0 {
                            grants.extend(r.force_grant());
                        }
                    }
                    _ if !grants.is_empty() => {
                        // Any grant, stale ones included; sometimes delivered twice.
                        let i = rng.below(grants.len());
                        let g = if rng.below(3) == 0 {
                            grants[i]
                        } else {
                            grants.swap_remove(i)
                        };
                        tx.on_credit(g).unwrap();
                        assert!(tx.sent() - tx.consumed() <= window);
                    }
                    _ => {}
                }
                assert_eq!(&out[..], &data[..out.len()], "seed {seed}");
            }
            assert_eq!(out, data, "seed {seed}");
            assert_eq!(r.consumed(), total as u64);
            assert_eq!(r.received(), total as u64);
        }
    }
}
