//! Replies and the length-delimited frame codec used on streams.
//!
//! ```text
//! frame = len:varint(u32) | bytes[len]
//! reply = 0x00                          Ack: the batch is durable (or was already applied)
//!       | 0x01 reason:varint(u16)       Nack: permanently rejected, for this reason code
//!       | 0x02 after_ms:varint(u32)     Retry: overload or a transient fault; retry later
//! ```

use crate::reader::Reader;
use edgetally_core::RejectCode;

/// A merger's answer to one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Durable (or already applied): the producer may forget the batch.
    Ack,
    /// Permanently rejected; the number is a [`RejectCode`] (kept raw so that codes added by
    /// newer mergers still round-trip).
    Nack(u16),
    /// Try again after at least this many milliseconds.
    Retry {
        /// Suggested delay.
        after_ms: u32,
    },
}

impl Reply {
    /// A Nack for a known code.
    pub fn nack(code: RejectCode) -> Reply {
        Reply::Nack(code.as_u16())
    }

    /// The reason of a Nack, if known to this build.
    pub fn reason(&self) -> Option<RejectCode> {
        match self {
            Reply::Nack(n) => RejectCode::from_u16(*n),
            _ => None,
        }
    }

    /// Encodes the reply (postcard enum encoding).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6);
        match *self {
            Reply::Ack => out.push(0),
            Reply::Nack(code) => {
                out.push(1);
                push_varint(&mut out, code as u64);
            }
            Reply::Retry { after_ms } => {
                out.push(2);
                push_varint(&mut out, after_ms as u64);
            }
        }
        out
    }

    /// Decodes a reply; anything else is `Malformed`.
    pub fn decode(bytes: &[u8]) -> Result<Reply, RejectCode> {
        let mut r = Reader::new(bytes);
        let reply = match r.u32()? {
            0 => Reply::Ack,
            1 => {
                let n = r.u32()?;
                Reply::Nack(u16::try_from(n).map_err(|_| RejectCode::Malformed)?)
            }
            2 => Reply::Retry { after_ms: r.u32()? },
            _ => return Err(RejectCode::Malformed),
        };
        if r.remaining() != 0 {
            return Err(RejectCode::TrailingBytes);
        }
        Ok(reply)
    }
}

pub(crate) fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Prefixes `payload` with its varint length.
pub fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 5);
    push_varint(&mut out, payload.len() as u64);
    out.extend_from_slice(payload);
    out
}

/// Splits a byte stream into frames, refusing any frame longer than `max_len` as soon as its
/// length prefix is read (so a hostile peer cannot make us buffer it).
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_len: usize,
}

impl FrameDecoder {
    /// A decoder for frames of at most `max_len` bytes.
    pub fn new(max_len: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            max_len,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or an error that ends
    /// the stream (oversized or malformed length).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, RejectCode> {
        let mut len: u64 = 0;
        let mut header = 0;
        loop {
            let Some(&b) = self.buf.get(header) else {
                return Ok(None);
            };
            if header == 5 {
                return Err(RejectCode::Malformed);
            }
            len |= ((b & 0x7f) as u64) << (7 * header);
            header += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if len > self.max_len as u64 {
            return Err(RejectCode::FrameTooLarge);
        }
        let end = header + len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        let frame = self.buf[header..end].to_vec();
        self.buf.drain(..end);
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reply_bytes() {
        assert_eq!(Reply::Ack.encode(), [0x00]);
        assert_eq!(Reply::nack(RejectCode::BadSignature).encode(), [0x01, 0x07]);
        assert_eq!(Reply::Retry { after_ms: 300 }.encode(), [0x02, 0xac, 0x02]);
        for r in [
            Reply::Ack,
            Reply::Nack(7),
            Reply::Nack(65535),
            Reply::Retry { after_ms: u32::MAX },
        ] {
            assert_eq!(Reply::decode(&r.encode()), Ok(r));
        }
        assert_eq!(Reply::decode(&[3]), Err(RejectCode::Malformed));
        assert_eq!(Reply::decode(&[0, 0]), Err(RejectCode::TrailingBytes));
        assert_eq!(
            Reply::decode(&[1, 0x80, 0x80, 0x04]),
            Err(RejectCode::Malformed)
        );
    }

    proptest! {
        #[test]
        fn frames_survive_any_split(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
                                    cut in 1usize..50) {
            let stream: Vec<u8> = frames.iter().flat_map(|f| encode_frame(f)).collect();
            let mut d = FrameDecoder::new(1000);
            let mut got = Vec::new();
            for chunk in stream.chunks(cut) {
                d.push(chunk);
                while let Some(f) = d.next_frame()? { got.push(f); }
            }
            prop_assert_eq!(got, frames);
            prop_assert_eq!(d.buffered(), 0);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Reply::decode(&bytes);
            let mut d = FrameDecoder::new(16);
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_frame() {}
        }
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header() {
        let mut d = FrameDecoder::new(10);
        d.push(&[11]);
        assert_eq!(d.next_frame(), Err(RejectCode::FrameTooLarge));
    }
}
