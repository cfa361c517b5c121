//! Length-prefixed frames: a 4-byte little-endian length, then that many bytes of UTF-8 JSON.

use std::io::{self, Read, Write};

/// Largest JSON frame either side accepts. Pixels never travel in frames, so 1 MiB is generous.
pub const MAX_FRAME_LEN: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the stream cleanly between two frames.
    #[error("connection closed")]
    Closed,
    #[error("truncated frame: the header announced {expected} bytes but the stream ended after {got}")]
    Truncated { expected: usize, got: usize },
    #[error("frame of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads one frame. A stream that ends inside the 4-byte header or the body is `Truncated`.
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    let got = read_full(r, &mut header)?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    if got < 4 {
        return Err(FrameError::Truncated { expected: 4, got });
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    let got = read_full(r, &mut body)?;
    if got < len {
        return Err(FrameError::Truncated { expected: len, got });
    }
    Ok(body)
}

/// Writes one frame in a single `write_all` so frames from several threads never interleave
/// when the writer is shared behind a lock.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf)?;
    w.flush()
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"{\"type\":\"ping\"}").unwrap();
        write_frame(&mut wire, b"{}").unwrap();
        let mut r = &wire[..];
        assert_eq!(read_frame(&mut r, MAX_FRAME_LEN).unwrap(), b"{\"type\":\"ping\"}");
        assert_eq!(read_frame(&mut r, MAX_FRAME_LEN).unwrap(), b"{}");
        assert!(matches!(read_frame(&mut r, MAX_FRAME_LEN), Err(FrameError::Closed)));
    }

    #[test]
    fn truncated_header_and_body() {
        let mut r: &[u8] = &[5, 0];
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME_LEN),
            Err(FrameError::Truncated { expected: 4, got: 2 })
        ));
        let mut r: &[u8] = &[5, 0, 0, 0, b'{', b'}'];
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME_LEN),
            Err(FrameError::Truncated { expected: 5, got: 2 })
        ));
    }

    #[test]
    fn oversized_is_refused_before_reading_the_body() {
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0x7f];
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME_LEN),
            Err(FrameError::TooLarge { len: 0x7fff_ffff, .. })
        ));
    }
}
