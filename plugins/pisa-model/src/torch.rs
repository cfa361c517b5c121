//! Checks a torch.save file before candle's pickle reader sees it. That reader trusts the
//! file: a length inside the pickle ("a string of 2.6 GB follows") or a tensor's shape is
//! allocated before a byte of it is read, so a damaged or hostile checkpoint could take all
//! memory (found by the fuzzer, tests/fuzz). Here every length-prefixed pickle argument must
//! fit in what is left of the pickle, and every tensor in the zip entry that holds it. The
//! reader also indexes tuples as torch writes them (`args.remove(3)`), so a damaged pickle
//! makes it panic: [`read`] runs it where a panic becomes an error, as a worker must not die of
//! a file (and a panic must not cross the plugin ABI).

use candle_core::Tensor;
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// The most a checkpoint's pickle (its structure and keys, not its tensors) may hold: real
/// ones are kilobytes.
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// Why [`read`] gave no tensors.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file is damaged or hostile: no key of it can be read.
    #[error("{0}")]
    Damaged(String),
    /// candle's reader refused it (not a torch.save file, no such key, …).
    #[error("{0}")]
    Refused(String),
}

/// Every tensor of a torch.save file (under `key` of its top-level dict, if given), after
/// [`check`]; a panic of candle's reader is a [`ReadError::Damaged`].
///
/// The tensors are read through one open archive: candle's `read_all_with_key` opens the file
/// and parses the zip directory again for every tensor, quadratic in their number (a PiSA-SR
/// checkpoint has over a thousand).
pub fn read(path: &Path, key: Option<&str>) -> Result<Vec<(String, Tensor)>, ReadError> {
    check(path).map_err(ReadError::Damaged)?;
    let refused = |e: String| ReadError::Refused(e);
    let infos = guarded(|| candle_core::pickle::read_pth_tensor_info(path, false, key)).map_err(ReadError::Damaged)?.map_err(|e| refused(e.to_string()))?;
    let file = File::open(path).map_err(|e| refused(e.to_string()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| refused(e.to_string()))?;
    let mut out = Vec::with_capacity(infos.len());
    for info in infos {
        let tensor = guarded(|| tensor(&mut zip, &info)).map_err(ReadError::Damaged)?.map_err(|e| refused(format!("tensor `{}`: {e}", info.name)))?;
        out.push((info.name, tensor));
    }
    Ok(out)
}

/// One tensor from its storage entry, as candle's reader does it: contiguous, or Fortran-
/// contiguous (read reversed, then permuted back).
fn tensor<R: Read + std::io::Seek>(zip: &mut zip::ZipArchive<R>, info: &candle_core::pickle::TensorInfo) -> Result<Tensor, String> {
    let layout = &info.layout;
    let fortran = layout.is_fortran_contiguous();
    if !layout.is_contiguous() && !fortran {
        return Err(format!("it is stored with strides {:?}, which are not supported", layout.stride()));
    }
    let mut entry = zip.by_name(&info.path).map_err(|e| format!("its storage `{}`: {e}", info.path))?;
    std::io::copy(&mut (&mut entry).take(layout.start_offset() as u64), &mut std::io::sink()).map_err(|e| e.to_string())?;
    let bytes_len = layout.shape().elem_count() * info.dtype.size_in_bytes();
    let mut bytes = Vec::with_capacity(bytes_len);
    (&mut entry).take(bytes_len as u64).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() != bytes_len {
        return Err(format!("its storage `{}` ends after {} of {bytes_len} bytes", info.path, bytes.len()));
    }
    let dims = layout.dims();
    if dims.len() > 1 && fortran {
        let reversed: Vec<usize> = dims.iter().rev().copied().collect();
        let t = Tensor::from_raw_buffer(&bytes, info.dtype, &reversed, &candle_core::Device::Cpu).map_err(|e| e.to_string())?;
        return t.permute((0..dims.len()).rev().collect::<Vec<_>>()).map_err(|e| e.to_string());
    }
    Tensor::from_raw_buffer(&bytes, info.dtype, dims, &candle_core::Device::Cpu).map_err(|e| e.to_string())
}

/// Runs one of candle's pickle readers, its panics turned into an error.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
        format!("its pickle is damaged (the reader stopped: {})", what.unwrap_or_else(|| "a panic".into()))
    })
}

/// Why the file cannot be read safely; `Ok` also for files that are not zips (candle then
/// says what is wrong with them without reading anything).
pub fn check(path: &Path) -> Result<(), String> {
    let Ok(mut zip) = File::open(path).map_err(|e| e.to_string()).map(zip::ZipArchive::new)? else {
        return Ok(());
    };
    let names: Vec<String> = zip.file_names().filter_map(|n| n.ok().map(|n| n.into_owned())).collect();
    for name in names.iter().filter(|n| n.ends_with("data.pkl")) {
        let stored = zip.by_name_raw(name.as_bytes()).map(|e| e.compression() == zip::CompressionMethod::Stored).unwrap_or(false);
        // torch.save stores entries uncompressed: read those raw, as candle does, without
        // insisting on their CRC (which candle's reader does not check either).
        let entry = if stored { zip.by_name_raw(name.as_bytes()) } else { zip.by_name(name) }.map_err(|e| format!("{name}: {e}"))?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(format!("its pickle `{name}` claims {} bytes; checkpoints' are far smaller", entry.size()));
        }
        let mut pickle = Vec::new();
        entry.take(MAX_PICKLE_BYTES).read_to_end(&mut pickle).map_err(|e| format!("{name}: {e}"))?;
        walk(&pickle).map_err(|why| format!("its pickle `{name}` is damaged: {why}"))?;
    }
    // The pickle is sound: now each tensor must fit in the entry that stores it.
    let Ok(infos) = guarded(|| candle_core::pickle::read_pth_tensor_info(path, false, None))? else { return Ok(()) };
    for t in infos {
        let elements = t.layout.dims().iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let bytes = elements
            .and_then(|n| n.checked_add(t.layout.start_offset()))
            .and_then(|n| n.checked_mul(t.dtype.size_in_bytes()));
        let stored = zip.by_name(&t.path).map(|e| e.size()).unwrap_or(0);
        if bytes.is_none_or(|b| b as u64 > stored) {
            return Err(format!("tensor `{}` of shape {:?} needs more bytes than its entry `{}` holds ({stored})", t.name, t.layout.dims(), t.path));
        }
    }
    Ok(())
}

/// Walks a pickle's opcodes (protocols 0–5), checking that each length-prefixed argument fits
/// in the bytes left. Stops at STOP, or at an opcode it does not know (candle refuses those).
fn walk(p: &[u8]) -> Result<(), String> {
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<usize, String> {
        let start = *at;
        *at = start.checked_add(n).filter(|&end| end <= p.len()).ok_or("it ends inside an opcode's argument")?;
        Ok(start)
    };
    let le = |bytes: &[u8]| bytes.iter().rev().fold(0u64, |v, &b| (v << 8) | b as u64);
    while at < p.len() {
        let op = p[at];
        at += 1;
        let fixed = match op {
            b'.' => return Ok(()),
            b'(' | b'0' | b'1' | b'2' | b'N' | 0x88 | 0x89 | b'R' | b'b' | b'a' | b'e' | b'd' | b'}' | b'l' | b']' | b't'
            | b')' | 0x85 | 0x86 | 0x87 | b's' | b'u' | b'Q' | 0x81 | 0x8f | 0x90 | 0x91 | 0x92 | 0x93 | 0x94 | b'o' => 0,
            0x80 | b'K' | b'h' | b'q' | 0x82 => 1,
            b'M' | 0x83 => 2,
            b'J' | b'j' | b'r' | 0x84 => 4,
            b'G' | 0x95 => 8,
            // Length-prefixed: LONG1, SHORT_BINUNICODE, SHORT_BINBYTES, SHORT_BINSTRING (1-byte
            // length); LONG4, BINUNICODE, BINBYTES, BINSTRING (4); BINUNICODE8, BINBYTES8,
            // BYTEARRAY8 (8).
            0x8a | 0x8c | b'C' | b'U' | 0x8b | b'X' | b'B' | b'T' | 0x8d | 0x8e | 0x96 => {
                let width = match op {
                    0x8a | 0x8c | b'C' | b'U' => 1,
                    0x8b | b'X' | b'B' | b'T' => 4,
                    _ => 8,
                };
                let start = take(&mut at, width)?;
                let len = le(&p[start..start + width]);
                let left = (p.len() - at) as u64;
                if len > left {
                    return Err(format!("opcode {op:#04x} at byte {} claims {len} bytes, {left} are left", start - 1));
                }
                at += len as usize;
                continue;
            }
            // Text arguments up to a newline (GLOBAL and INST: two of them).
            b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'g' | b'p' | b'c' | b'i' => {
                let lines = if matches!(op, b'c' | b'i') { 2 } else { 1 };
                for _ in 0..lines {
                    let end = p[at..].iter().position(|&b| b == b'\n').ok_or("a text argument has no end")?;
                    at += end + 1;
                }
                continue;
            }
            _ => return Ok(()),
        };
        take(&mut at, fixed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{read, walk, ReadError};
    use std::io::Write;

    #[test]
    fn a_pickle_that_makes_candle_panic_is_an_error() {
        // {"w": torch._utils._rebuild_tensor_v2()}: candle's reader takes the fourth of the
        // (empty) arguments and panics (found by the torch_pickle fuzz target).
        let pickle = b"\x80\x02}q\x00X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n)Rs.";
        let path = std::env::temp_dir().join(format!("tessera-panic-{}.pth", std::process::id()));
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        zip.start_file("archive/data.pkl", zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored)).unwrap();
        zip.write_all(pickle).unwrap();
        zip.finish().unwrap();
        let got = read(&path, None);
        std::fs::remove_file(&path).unwrap();
        match got {
            Err(ReadError::Damaged(why)) => assert!(why.contains("the reader stopped"), "{why}"),
            other => panic!("expected a damaged-pickle error, got {:?}", other.map(|t| t.len())),
        }
    }

    #[test]
    fn lengths_must_fit_in_the_pickle() {
        // PROTO 2, SHORT_BINUNICODE "ab", STOP.
        assert!(walk(&[0x80, 2, 0x8c, 2, b'a', b'b', b'.']).is_ok());
        // BINUNICODE claiming 2.6 GB with two bytes after it.
        let err = walk(&[0x80, 2, b'X', 0x16, 0x2c, 0x00, 0x9c, b'a', b'b', b'.']).unwrap_err();
        assert!(err.contains("claims 2617256982 bytes, 3 are left"), "{err}");
        // An argument cut off by the end of the data.
        assert!(walk(&[b'J', 1, 2]).is_err());
        // GLOBAL's two lines, then BINPUT 0 and STOP.
        assert!(walk(b"ctorch\nFloatStorage\nq\x00.").is_ok());
    }
}
