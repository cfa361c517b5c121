//! Separable resampling (Lanczos-3, Keys bicubic) with Pillow's conventions, banded and on all
//! cores: the classic engine's maths, and the `base` layer every engine shares.

pub mod filter;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use tessera_plugin_abi::pixels::{Band, ImageMut, ImageRef};
use tessera_plugin_abi::plugin::HostCalls;
use tessera_plugin_abi::EngineError;

pub use filter::Filter;
use filter::{blend_rows, resample_row, Taps};

/// Output rows per band: enough that the filter's 4–6 extra input rows per band cost little,
/// few enough that cancel and progress come several times a second.
fn band_rows(out_height: usize, scale: usize) -> usize {
    (32 * scale).min(out_height.max(1))
}

/// The separable resampling of one image to one output size, computed band by band: what the
/// classic engine runs on all cores, and what other engines use for their `base` layer.
pub struct Resampler {
    tx: Taps,
    ty: Taps,
    channels: usize,
    alpha: bool,
    in_width: usize,
    out_width: usize,
    identity: bool,
}

/// Per-thread working memory for [`Resampler::band`].
#[derive(Default)]
pub struct Scratch {
    row_in: Vec<f32>,
    horiz: Vec<f32>,
    row_out: Vec<f32>,
}

impl Resampler {
    pub fn new(input: &tessera_protocol::Layout, out_width: usize, out_height: usize, filter: Filter) -> Resampler {
        let (w, h) = (input.width as usize, input.height as usize);
        Resampler {
            tx: Taps::new(filter, w, out_width),
            ty: Taps::new(filter, h, out_height),
            channels: input.channels as usize,
            alpha: input.alpha,
            in_width: w,
            out_width,
            identity: w == out_width && h == out_height,
        }
    }

    pub fn out_width(&self) -> usize {
        self.out_width
    }

    /// Computes output rows `y0 .. y0 + rows` and hands each to `emit(dy, row)` as f32
    /// (`out_width × channels` values; colour unpremultiplied, alpha clamped).
    pub fn band(&self, input: &ImageRef<'_>, y0: usize, rows: usize, scratch: &mut Scratch, mut emit: impl FnMut(usize, &[f32])) {
        let (c, ow) = (self.channels, self.out_width);
        scratch.row_in.resize(self.in_width * c, 0.0);
        scratch.row_out.resize(ow * c, 0.0);
        if self.identity {
            for dy in 0..rows {
                input.read_row(y0 + dy, &mut scratch.row_in);
                emit(dy, &scratch.row_in);
            }
            return;
        }
        let span = self.ty.input_span(y0..y0 + rows);
        scratch.horiz.resize(span.len() * ow * c, 0.0);
        for (k, y) in span.clone().enumerate() {
            input.read_row(y, &mut scratch.row_in);
            if self.alpha {
                premultiply(&mut scratch.row_in, c);
            }
            resample_row(&self.tx, c, &scratch.row_in, &mut scratch.horiz[k * ow * c..(k + 1) * ow * c]);
        }
        for dy in 0..rows {
            let yo = y0 + dy;
            let first = self.ty.start[yo] - span.start;
            let taps: Vec<&[f32]> = (0..self.ty.weights[yo].len())
                .map(|k| &scratch.horiz[(first + k) * ow * c..(first + k + 1) * ow * c])
                .collect();
            blend_rows(&self.ty.weights[yo], &taps, &mut scratch.row_out);
            if self.alpha {
                unpremultiply(&mut scratch.row_out, c);
            }
            emit(dy, &scratch.row_out);
        }
    }
}

/// Upscales `input` into `out` (whose size sets the scale), band by band on all cores,
/// reporting progress per band and stopping at the next band once cancelled.
pub fn upscale(input: &ImageRef<'_>, out: &mut ImageMut<'_>, filter: Filter, calls: &HostCalls<'_>) -> Result<(), EngineError> {
    let (w, c) = (input.width(), input.channels());
    let (ow, oh) = (out.width(), out.height());
    if out.layout.channels as usize != c || out.layout.alpha != input.layout.alpha {
        return Err(EngineError::Failed("output channels differ from the input's".into()));
    }
    let scale = (ow / w).max(1);
    let resampler = Resampler::new(&input.layout, ow, oh, filter);
    let bands: Vec<Mutex<Option<Band<'_>>>> =
        out.bands(band_rows(oh, scale)).into_iter().map(|b| Mutex::new(Some(b))).collect();
    let total = bands.len() as u64;
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let cancelled = AtomicBool::new(false);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(bands.len());
    calls.progress(0, total, filter.name());

    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut scratch = Scratch::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= bands.len() {
                        break;
                    }
                    if calls.is_cancelled() {
                        cancelled.store(true, Ordering::Relaxed);
                        break;
                    }
                    let mut band = bands[i].lock().unwrap().take().expect("each band is taken once");
                    let (y0, rows) = (band.y0, band.rows);
                    if resampler.identity && same_storage(&input.layout, band.format()) {
                        for dy in 0..rows {
                            band.copy_row_bytes(dy, input.row_bytes(y0 + dy));
                        }
                    } else {
                        resampler.band(input, y0, rows, &mut scratch, |dy, row| band.write_row(dy, row));
                    }
                    let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                    calls.progress(d, total, filter.name());
                }
            });
        }
    });
    if cancelled.load(Ordering::Relaxed) {
        return Err(EngineError::Cancelled);
    }
    Ok(())
}

/// Whether rows can be copied byte for byte: same samples, channels and no offset to add.
fn same_storage(input: &tessera_protocol::Layout, (out, offset): (&tessera_protocol::Layout, f32)) -> bool {
    input.sample == out.sample && input.channels == out.channels && offset == 0.0
}

/// Colour is resampled premultiplied by alpha so transparent pixels' colours cannot bleed
/// into their neighbours; alpha itself is resampled as a plain channel.
pub fn premultiply(row: &mut [f32], channels: usize) {
    for px in row.chunks_exact_mut(channels) {
        let a = px[channels - 1];
        for v in &mut px[..channels - 1] {
            *v *= a;
        }
    }
}

/// Inverse of [`premultiply`]. Alpha is clamped to [0, 1]; colour too, since dividing by a
/// small alpha amplifies the filter's ringing. Fully transparent pixels get colour 0.
pub fn unpremultiply(row: &mut [f32], channels: usize) {
    for px in row.chunks_exact_mut(channels) {
        let a = px[channels - 1].clamp(0.0, 1.0);
        px[channels - 1] = a;
        let inv = if a > 1.0 / 65536.0 { 1.0 / a } else { 0.0 };
        for v in &mut px[..channels - 1] {
            *v = (*v * inv).clamp(0.0, 1.0);
        }
    }
}
