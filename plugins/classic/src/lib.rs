//! The classic engine: Lanczos-3 (default) or bicubic upscaling in f32 on any buffer layout.
//! It invents no detail, so it returns the `base` layer alone; every neural engine's `base`
//! is this engine's bicubic image.

pub mod resample;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde_json::{json, Value};
use tessera_plugin_abi::pixels::{Band, ImageMut, ImageRef};
use tessera_plugin_abi::plugin::HostCalls;
use tessera_plugin_abi::{export_plugin, Engine, EngineError, Job};
use tessera_protocol::{LayerRole, PluginInfo};

use resample::{blend_rows, resample_row, Filter, Taps};

pub const MODEL_ID: &str = "classic";

pub struct Classic;

impl Engine for Classic {
    fn describe() -> PluginInfo {
        serde_json::from_value(json!({
            "id": "classic",
            "version": env!("CARGO_PKG_VERSION"),
            "name": "Classic resampling",
            "description": "Lanczos-3 and bicubic upscaling in f32. Invents no detail: returns the base layer alone.",
            "models": [{
                "id": MODEL_ID,
                "name": "Lanczos-3 / bicubic",
                "description": "Separable resampling with Pillow's conventions; alpha is resampled apart (premultiplied colour). ×1 is an exact copy, for round-trip checks.",
                "scales": [1, 2, 3, 4],
                "layers": ["base"],
                "parameters": [{
                    "name": "filter", "kind": "choice", "default": "lanczos3",
                    "choices": ["lanczos3", "bicubic"],
                    "description": "Resampling filter: Lanczos-3 (sharper) or Keys bicubic a = −0.5 (the neural engines' base)."
                }],
                "exact_render": false
            }]
        }))
        .expect("static description is valid")
    }

    fn create(_config: &Value) -> Result<Self, String> {
        Ok(Classic)
    }

    fn process(&mut self, job: &mut Job<'_>) -> Result<(), EngineError> {
        let filter_name = job.param_str("filter").unwrap_or("lanczos3");
        let filter = Filter::parse(filter_name)
            .ok_or_else(|| EngineError::Failed(format!("unknown filter `{filter_name}`")))?;
        let Job { input, outputs, calls, .. } = job;
        let Some((_, out)) = outputs.iter_mut().find(|(r, _)| *r == LayerRole::Base) else {
            return Err(EngineError::Failed("the host allocated no base layer".into()));
        };
        upscale(input, out, filter, calls)
    }
}

export_plugin!(Classic);

/// Output rows per band: enough that the filter's 4–6 extra input rows per band cost little,
/// few enough that cancel and progress come several times a second.
fn band_rows(out_height: usize, scale: usize) -> usize {
    (32 * scale).min(out_height.max(1))
}

/// Upscales `input` into `out` (whose size sets the scale), band by band on all cores,
/// reporting progress per band and stopping at the next band once cancelled.
pub fn upscale(input: &ImageRef<'_>, out: &mut ImageMut<'_>, filter: Filter, calls: &HostCalls<'_>) -> Result<(), EngineError> {
    let (w, h, c) = (input.width(), input.height(), input.channels());
    let (ow, oh) = (out.width(), out.height());
    if out.layout.channels as usize != c || out.layout.alpha != input.layout.alpha {
        return Err(EngineError::Failed("output channels differ from the input's".into()));
    }
    let scale = (ow / w).max(1);
    let tx = Taps::new(filter, w, ow);
    let ty = Taps::new(filter, h, oh);
    let identity = ow == w && oh == h;
    let alpha = input.layout.alpha;

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
                let mut row_in = vec![0f32; w * c];
                let mut horiz: Vec<f32> = Vec::new();
                let mut row_out = vec![0f32; ow * c];
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
                    if identity && same_storage(&input.layout, band.format()) {
                        for dy in 0..band.rows {
                            band.copy_row_bytes(dy, input.row_bytes(band.y0 + dy));
                        }
                    } else if identity {
                        for dy in 0..band.rows {
                            input.read_row(band.y0 + dy, &mut row_in);
                            band.write_row(dy, &row_in);
                        }
                    } else {
                        let span = ty.input_span(band.y0..band.y0 + band.rows);
                        horiz.resize(span.len() * ow * c, 0.0);
                        for (k, y) in span.clone().enumerate() {
                            input.read_row(y, &mut row_in);
                            if alpha {
                                premultiply(&mut row_in, c);
                            }
                            resample_row(&tx, c, &row_in, &mut horiz[k * ow * c..(k + 1) * ow * c]);
                        }
                        for dy in 0..band.rows {
                            let yo = band.y0 + dy;
                            let first = ty.start[yo] - span.start;
                            let rows: Vec<&[f32]> = (0..ty.weights[yo].len())
                                .map(|k| &horiz[(first + k) * ow * c..(first + k + 1) * ow * c])
                                .collect();
                            blend_rows(&ty.weights[yo], &rows, &mut row_out);
                            if alpha {
                                unpremultiply(&mut row_out, c);
                            }
                            band.write_row(dy, &row_out);
                        }
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
