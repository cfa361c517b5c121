//! From network outputs to the layer contract's layers (DESIGN.md §3), strip by strip:
//! `base` is the classic bicubic upscale; how the detail layers are made depends on the model.

use tessera_plugin_abi::{EngineError, Job};
use tessera_protocol::LayerRole;
use tessera_resample::filter::{blend_rows, resample_row, Taps};
use tessera_resample::{Filter, Resampler, Scratch};

use crate::tiled::Strip;

/// Receives output rows as the tiler finishes them.
pub trait LayerSink {
    /// The strip's first `final_rows` rows will not change any more. Writes as many rows from
    /// the strip's top as it can and returns how many; once every row is final it must write
    /// them all.
    fn write(&mut self, job: &mut Job<'_>, strip: &Strip, final_rows: usize) -> Result<usize, EngineError>;
}

/// The bicubic `base` rows, and the output rows handed to the editor.
struct Base {
    resampler: Resampler,
    scratch: Scratch,
}

impl Base {
    fn new(job: &Job<'_>, scale: usize) -> Base {
        let l = job.input.layout;
        Base {
            resampler: Resampler::new(&l, l.width as usize * scale, l.height as usize * scale, Filter::Bicubic),
            scratch: Scratch::default(),
        }
    }

    /// Computes base rows `y0 .. y0 + rows`; `detail(dy, base, pix, sem)` fills the two detail
    /// rows' colour (alpha is the base's); then all three rows are written.
    fn write(&mut self, job: &mut Job<'_>, y0: usize, rows: usize, mut detail: impl FnMut(usize, &[f32], &mut [f32], &mut [f32])) {
        let Job { input, outputs, .. } = job;
        let layout = input.layout;
        let c = layout.channels as usize;
        let ow = self.resampler.out_width();
        let mut pix_row = vec![0f32; ow * c];
        let mut sem_row = vec![0f32; ow * c];
        self.resampler.band(input, y0, rows, &mut self.scratch, |dy, base| {
            detail(dy, base, &mut pix_row, &mut sem_row);
            if layout.alpha {
                for x in 0..ow {
                    pix_row[x * c + c - 1] = base[x * c + c - 1];
                    sem_row[x * c + c - 1] = base[x * c + c - 1];
                }
            }
            for (role, img) in outputs.iter_mut() {
                match role {
                    LayerRole::Base => img.write_row(y0 + dy, base),
                    LayerRole::PixelDetail => img.write_row(y0 + dy, &pix_row),
                    LayerRole::SemanticDetail => img.write_row(y0 + dy, &sem_row),
                    // The cnn models render no separate exact image.
                    LayerRole::Exact => {}
                }
            }
        });
    }
}

/// The colour channels of a document: RGB, or grey (the networks' mean).
fn colour_channels(job: &Job<'_>) -> usize {
    job.input.layout.channels as usize - job.input.layout.alpha as usize
}

/// Network `n`'s colour at strip row `dy`, column `x`, document channel `ch`.
fn net_colour(strip: &Strip, n: usize, colour: usize, ch: usize, dy: usize, x: usize) -> f32 {
    if colour >= 3 {
        strip.sample(n, ch, dy, x)
    } else {
        (strip.sample(n, 0, dy, x) + strip.sample(n, 1, dy, x) + strip.sample(n, 2, dy, x)) / 3.0
    }
}

/// Two networks, a pixel-loss model and its GAN fine-tune: `pixel_detail` = first − base,
/// `semantic_detail` = second − first.
pub struct PairDifference {
    base: Base,
    colour: usize,
    channels: usize,
}

impl PairDifference {
    pub fn new(job: &Job<'_>, scale: usize) -> PairDifference {
        PairDifference { base: Base::new(job, scale), colour: colour_channels(job), channels: job.input.layout.channels as usize }
    }
}

impl LayerSink for PairDifference {
    fn write(&mut self, job: &mut Job<'_>, strip: &Strip, final_rows: usize) -> Result<usize, EngineError> {
        let (colour, c) = (self.colour, self.channels);
        self.base.write(job, strip.y0, final_rows, |dy, base, pix, sem| {
            for x in 0..strip.width {
                for ch in 0..colour {
                    let (p, g) = (net_colour(strip, 0, colour, ch, dy, x), net_colour(strip, 1, colour, ch, dy, x));
                    pix[x * c + ch] = p - base[x * c + ch];
                    sem[x * c + ch] = g - p;
                }
            }
        });
        Ok(final_rows)
    }
}

/// One network's output `y`, split by frequency band with the classic resamplers: `D` the
/// bicubic downscale to the input's size, `U` the bicubic upscale back.
/// `pixel_detail` = U(D(y)) − base: what the network changed at the input's own resolution
/// (noise, blocking and blur removed); `semantic_detail` = y − U(D(y)): what lies above the
/// input's resolution (texture it invented). base + pixel + semantic = y.
///
/// Rows of U(D(y)) need rows of y a little below them (the two filters' reach, about 20 output
/// rows at ×4), so this sink writes that far behind the finished rows. It keeps D(y), which is
/// the input's size, and a few horizontally downscaled rows of y.
pub struct BandSplit {
    base: Base,
    colour: usize,
    channels: usize,
    /// D: output size → input size, per axis. U: back.
    down_x: Taps,
    down_y: Taps,
    up_x: Taps,
    up_y: Taps,
    in_width: usize,
    /// Rows of y downscaled along x (`in_width × colour` each), from row `hd_first` on.
    hd: std::collections::VecDeque<Vec<f32>>,
    hd_first: usize,
    /// D(y), interleaved, its first `d_done` rows computed.
    d: Vec<f32>,
    d_done: usize,
}

impl BandSplit {
    pub fn new(job: &Job<'_>, scale: usize) -> BandSplit {
        let (w, h) = (job.input.width(), job.input.height());
        let colour = colour_channels(job);
        BandSplit {
            base: Base::new(job, scale),
            colour,
            channels: job.input.layout.channels as usize,
            down_x: Taps::new(Filter::Bicubic, w * scale, w),
            down_y: Taps::new(Filter::Bicubic, h * scale, h),
            up_x: Taps::new(Filter::Bicubic, w, w * scale),
            up_y: Taps::new(Filter::Bicubic, h, h * scale),
            in_width: w,
            hd: Default::default(),
            hd_first: 0,
            d: vec![0f32; w * h * colour],
            d_done: 0,
        }
    }

    /// Takes in the strip's final rows not seen yet, and computes every row of D(y) they allow.
    fn ingest(&mut self, strip: &Strip, final_rows: usize) {
        let colour = self.colour;
        let mut y_row = vec![0f32; strip.width * colour];
        for y in self.hd_first + self.hd.len()..strip.y0 + final_rows {
            let dy = y - strip.y0;
            for x in 0..strip.width {
                for ch in 0..colour {
                    y_row[x * colour + ch] = net_colour(strip, 0, colour, ch, dy, x);
                }
            }
            let mut row = vec![0f32; self.in_width * colour];
            resample_row(&self.down_x, colour, &y_row, &mut row);
            self.hd.push_back(row);
        }
        let seen = self.hd_first + self.hd.len();
        let row_len = self.in_width * colour;
        while self.d_done < self.down_y.start.len() {
            let j = self.d_done;
            let (start, taps) = (self.down_y.start[j], &self.down_y.weights[j]);
            if start + taps.len() > seen {
                break;
            }
            let rows: Vec<&[f32]> = (start..start + taps.len()).map(|y| self.hd[y - self.hd_first].as_slice()).collect();
            blend_rows(taps, &rows, &mut self.d[j * row_len..(j + 1) * row_len]);
            self.d_done += 1;
        }
        // Rows of y no later row of D reads.
        let keep_from = self.down_y.start.get(self.d_done).copied().unwrap_or(seen);
        while self.hd_first < keep_from && !self.hd.is_empty() {
            self.hd.pop_front();
            self.hd_first += 1;
        }
    }
}

impl LayerSink for BandSplit {
    fn write(&mut self, job: &mut Job<'_>, strip: &Strip, final_rows: usize) -> Result<usize, EngineError> {
        self.ingest(strip, final_rows);
        // Output rows whose U(D(y)) rows are all computable now.
        let mut end = strip.y0;
        while end < strip.y0 + final_rows && self.up_y.start[end] + self.up_y.weights[end].len() <= self.d_done {
            end += 1;
        }
        if end == strip.y0 {
            return Ok(0);
        }
        let (colour, c) = (self.colour, self.channels);
        let ow = strip.width;
        // U(D(y)) for the band: upscale the D rows it reads along x, then blend along y.
        let span = self.up_y.input_span(strip.y0..end);
        let row_len = self.in_width * colour;
        let uh: Vec<Vec<f32>> = span
            .clone()
            .map(|j| {
                let mut row = vec![0f32; ow * colour];
                resample_row(&self.up_x, colour, &self.d[j * row_len..(j + 1) * row_len], &mut row);
                row
            })
            .collect();
        let mut low = vec![0f32; ow * colour];
        let (up_y, y0) = (&self.up_y, strip.y0);
        self.base.write(job, y0, end - y0, |dy, base, pix, sem| {
            let yo = y0 + dy;
            let rows: Vec<&[f32]> = (0..up_y.weights[yo].len()).map(|k| uh[up_y.start[yo] + k - span.start].as_slice()).collect();
            blend_rows(&up_y.weights[yo], &rows, &mut low);
            for x in 0..ow {
                for ch in 0..colour {
                    let l = low[x * colour + ch];
                    pix[x * c + ch] = l - base[x * c + ch];
                    sem[x * c + ch] = net_colour(strip, 0, colour, ch, dy, x) - l;
                }
            }
        });
        Ok(end - y0)
    }
}
