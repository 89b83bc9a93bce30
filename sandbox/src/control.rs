//! Frames on the control socket between ccnoded and a worker: a 4-byte
//! big-endian length, then that many bytes of JSON (an object with `v`, the
//! protocol version, and `type`). Both sides refuse frames over their limit.
//! The inference issue adds message types; this module fixes the framing
//! and the lifecycle messages: `ready` and `health`/`healthy` (worker to
//! ccnoded), `health` and `shutdown` (ccnoded to worker).

use std::io::{self, Read, Write};

use serde_json::{json, Value};

/// The control protocol version.
pub const CONTROL_VERSION: u64 = 1;

/// Largest frame accepted by default, in bytes.
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the peer closed the control socket")]
    Closed,
    #[error("control frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("control frame is not a JSON object with v = {CONTROL_VERSION} and a type")]
    Malformed,
    #[error("control socket")]
    Io(#[source] io::Error),
}

impl FrameError {
    /// A read timeout, as opposed to a broken peer.
    pub fn is_timeout(&self) -> bool {
        matches!(self, FrameError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, v: &Value) -> io::Result<()> {
    w.write_all(&encode_frame(v)?)
}

/// One frame's bytes: the length prefix, then the JSON.
pub fn encode_frame(v: &Value) -> io::Result<Vec<u8>> {
    let body = serde_json::to_vec(v).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(io::Error::other)?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    Ok(buf)
}

/// A message of `kind` with the protocol version.
pub fn message(kind: &str) -> Value {
    json!({"v": CONTROL_VERSION, "type": kind})
}

/// Reads one frame of at most `max` bytes and checks its envelope.
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Value, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(FrameError::Io(e)),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            FrameError::Io(e)
        }
    })?;
    let v: Value = serde_json::from_slice(&body).map_err(|_| FrameError::Malformed)?;
    if v["v"] != CONTROL_VERSION || !v["type"].is_string() {
        return Err(FrameError::Malformed);
    }
    Ok(v)
}

/// Reads frames from a socket with a read timeout without losing a frame
/// that arrives in pieces: bytes are kept until the frame is whole.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    max: usize,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            max,
        }
    }

    /// The next frame, reading until it is whole; `FrameError::Io` with a
    /// timeout kind when a read times out first (call again later: the
    /// bytes read so far are kept).
    pub fn next_frame(&mut self) -> Result<Value, FrameError> {
        loop {
            if let Some(v) = self.step()? {
                return Ok(v);
            }
        }
    }

    /// At most one read: the next frame if it is whole after it, else
    /// `None` (a read that timed out, or a frame still in pieces). A peer
    /// that sends a frame a byte at a time so never holds its reader for
    /// longer than one read.
    pub fn poll_frame(&mut self) -> Result<Option<Value>, FrameError> {
        match self.step() {
            Err(e) if e.is_timeout() => Ok(None),
            other => other,
        }
    }

    /// A whole buffered frame, if there is one; else one read, and the
    /// frame if that made it whole.
    fn step(&mut self) -> Result<Option<Value>, FrameError> {
        if let Some(v) = self.take()? {
            return Ok(Some(v));
        }
        let mut chunk = [0u8; 64 * 1024];
        let want = match self.declared() {
            Some(len) => (4 + len - self.buf.len()).min(chunk.len()),
            None => 4 - self.buf.len(),
        };
        match self.inner.read(&mut chunk[..want]) {
            Ok(0) => Err(FrameError::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.take()
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(FrameError::Io(e)),
        }
    }

    /// The length the buffered frame declares, once its prefix is read.
    fn declared(&self) -> Option<usize> {
        let len: [u8; 4] = self.buf.get(..4)?.try_into().ok()?;
        Some(u32::from_be_bytes(len) as usize)
    }

    /// The buffered frame, checked, once it is whole.
    fn take(&mut self) -> Result<Option<Value>, FrameError> {
        let Some(len) = self.declared() else {
            return Ok(None);
        };
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame: Vec<u8> = self.buf.drain(..4 + len).collect();
        let v: Value = serde_json::from_slice(&frame[4..]).map_err(|_| FrameError::Malformed)?;
        if v["v"] != CONTROL_VERSION || !v["type"].is_string() {
            return Err(FrameError::Malformed);
        }
        Ok(Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &message("ready")).unwrap();
        write_frame(&mut buf, &message("healthy")).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r, 1024).unwrap()["type"], "ready");
        assert_eq!(read_frame(&mut r, 1024).unwrap()["type"], "healthy");
        assert!(matches!(read_frame(&mut r, 1024), Err(FrameError::Closed)));
    }

    /// Gives out its bytes a few at a time, with a timeout between pieces.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        tick: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.tick = !self.tick;
            if self.tick {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "not yet"));
            }
            let n = out.len().min(3).min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn a_frame_in_pieces_with_timeouts_between_is_not_lost() {
        let mut data = Vec::new();
        write_frame(&mut data, &message("ready")).unwrap();
        write_frame(&mut data, &message("healthy")).unwrap();
        let mut r = FrameReader::new(
            Trickle {
                data,
                pos: 0,
                tick: false,
            },
            1024,
        );
        let mut got = Vec::new();
        loop {
            match r.next_frame() {
                Ok(f) => got.push(f["type"].as_str().unwrap().to_owned()),
                Err(e) if e.is_timeout() => continue,
                Err(FrameError::Closed) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, ["ready", "healthy"]);
    }

    /// One byte per read, never a timeout: a peer that keeps a frame
    /// coming, slowly.
    struct Drip(Vec<u8>, usize);

    impl Read for Drip {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let Some(&b) = self.0.get(self.1) else {
                return Ok(0);
            };
            out[0] = b;
            self.1 += 1;
            Ok(1)
        }
    }

    #[test]
    fn poll_frame_returns_after_one_read_of_a_frame_in_pieces() {
        let mut data = Vec::new();
        write_frame(&mut data, &message("healthy")).unwrap();
        let len = data.len();
        let mut r = FrameReader::new(Drip(data, 0), 1024);
        for read in 1..len {
            assert!(r.poll_frame().unwrap().is_none(), "after {read} bytes");
        }
        assert_eq!(r.poll_frame().unwrap().unwrap()["type"], "healthy");
        assert!(matches!(r.poll_frame(), Err(FrameError::Closed)));
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut big = (2_000_000u32).to_be_bytes().to_vec();
        big.extend_from_slice(&[b'x'; 16]);
        assert!(matches!(
            read_frame(&mut &big[..], 1024),
            Err(FrameError::TooLarge { len: 2_000_000, .. })
        ));
        for body in [
            &b"nope"[..],
            b"[1]",
            br#"{"type":"ready"}"#,
            br#"{"v":1,"type":3}"#,
            br#"{"v":2,"type":"x"}"#,
        ] {
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(body);
            assert!(
                matches!(read_frame(&mut &f[..], 1024), Err(FrameError::Malformed)),
                "{body:?}"
            );
        }
        let truncated = [0u8, 0, 0, 10, b'{'];
        assert!(matches!(
            read_frame(&mut &truncated[..], 1024),
            Err(FrameError::Closed)
        ));
    }
}
