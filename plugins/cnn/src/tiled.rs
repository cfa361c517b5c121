//! Running networks tile by tile over an image: overlapping tiles cross-faded with smooth
//! weights ([`crate::tiling`]), accumulated into a strip of output rows that spans one row of
//! tiles, and handed to a [`LayerSink`] as soon as no later tile can touch them, so memory
//! follows the tile size and the image width, never the image's area.

use candle_core::{Device, Tensor};
use tessera_plugin_abi::{EngineError, Job};

use crate::layers_out::LayerSink;
use tessera_tiling as tiling;
use crate::Network;

pub struct Tiled {
    pub width: usize,
    pub height: usize,
    pub tile: usize,
    pub overlap: usize,
    pub scale: usize,
}

/// Output rows `y0 .. y0 + rows` still being accumulated or not yet written: each network's
/// RGB planes and the tiles' weight sum.
pub struct Strip {
    pub y0: usize,
    pub rows: usize,
    pub width: usize,
    pub nets: Vec<Vec<f32>>,
    pub wsum: Vec<f32>,
}

impl Strip {
    /// Network `n`'s value at strip row `dy`, column `x`, channel `ch` (of its RGB), with the
    /// tiles' weights normalised.
    pub fn sample(&self, n: usize, ch: usize, dy: usize, x: usize) -> f32 {
        let at = dy * self.width + x;
        self.nets[n][ch * self.rows * self.width + at] / self.wsum[at]
    }

    /// Grows the strip to end at output row `end`.
    fn extend_to(&mut self, end: usize) {
        if end <= self.y0 + self.rows {
            return;
        }
        let rows = end - self.y0;
        for net in &mut self.nets {
            // Planes are row-major per channel: re-lay them for the new height.
            let mut grown = vec![0f32; 3 * rows * self.width];
            for ch in 0..3 {
                let old = &net[ch * self.rows * self.width..(ch + 1) * self.rows * self.width];
                grown[ch * rows * self.width..ch * rows * self.width + old.len()].copy_from_slice(old);
            }
            *net = grown;
        }
        self.wsum.resize(rows * self.width, 0.0);
        self.rows = rows;
    }

    /// Drops the first `n` rows (written out).
    fn advance(&mut self, n: usize) {
        let rows = self.rows - n;
        for net in &mut self.nets {
            let mut kept = vec![0f32; 3 * rows * self.width];
            for ch in 0..3 {
                let from = ch * self.rows * self.width + n * self.width;
                kept[ch * rows * self.width..(ch + 1) * rows * self.width].copy_from_slice(&net[from..from + rows * self.width]);
            }
            *net = kept;
        }
        self.wsum.drain(..n * self.width);
        self.y0 += n;
        self.rows = rows;
    }
}

impl Tiled {
    /// Runs every network on every tile, cross-fading the tiles, and passes finished rows to
    /// `sink`. Progress counts network passes; cancel is checked before each.
    pub fn run(
        &self,
        nets: &[(&dyn Network, &'static str)],
        rgb: &[f32],
        device: &Device,
        sink: &mut dyn LayerSink,
        job: &mut Job<'_>,
    ) -> Result<(), EngineError> {
        let (w, h, s) = (self.width, self.height, self.scale);
        let ow = w * s;
        let xs = tiling::windows(w, self.tile, self.overlap);
        let ys = tiling::windows(h, self.tile, self.overlap);
        let total = (nets.len() * xs.len() * ys.len()) as u64;
        let mut done = 0u64;
        let mut strip = Strip { y0: 0, rows: 0, width: ow, nets: vec![Vec::new(); nets.len()], wsum: Vec::new() };
        for (j, wy) in ys.iter().enumerate() {
            let weights_y = tiling::weights(&ys, j, s);
            strip.extend_to(wy.end * s);
            for (i, wx) in xs.iter().enumerate() {
                let (tw, th) = (wx.end - wx.start, wy.end - wy.start);
                let mut crop = Vec::with_capacity(3 * tw * th);
                for ch in 0..3 {
                    for y in wy.start..wy.end {
                        let row = ch * w * h + y * w;
                        crop.extend_from_slice(&rgb[row + wx.start..row + wx.end]);
                    }
                }
                // One input tensor for every network (they only read it).
                let x = Tensor::from_vec(crop, (1, 3, th, tw), device).map_err(|e| EngineError::Failed(format!("tile input: {e}")))?;
                let weights_x = tiling::weights(&xs, i, s);
                let (tow, toh) = (tw * s, th * s);
                for (n, (net, stage)) in nets.iter().enumerate() {
                    job.calls.check_cancel()?;
                    job.calls.progress(done, total, stage);
                    let fail = |e: candle_core::Error| EngineError::Failed(format!("{stage}: {e}"));
                    // On a pool thread: the network's parallel loops then share work by stealing.
                    let y = crate::layers::in_pool(|| net.forward(&x)).map_err(fail)?.flatten_all().map_err(fail)?.to_vec1::<f32>().map_err(fail)?;
                    let acc = &mut strip.nets[n];
                    let plane = strip.rows * ow;
                    for ty in 0..toh {
                        let sy = wy.start * s + ty - strip.y0;
                        for tx in 0..tow {
                            let wgt = weights_x[tx] * weights_y[ty];
                            let sx = wx.start * s + tx;
                            if n == 0 {
                                strip.wsum[sy * ow + sx] += wgt;
                            }
                            for ch in 0..3 {
                                acc[ch * plane + sy * ow + sx] += wgt * y[ch * toh * tow + ty * tow + tx];
                            }
                        }
                    }
                    done += 1;
                }
            }
            // Rows above the next tile row's first are final.
            let final_end = ys.get(j + 1).map_or(h * s, |next| next.start * s);
            let n = sink.write(job, &strip, final_end - strip.y0)?;
            strip.advance(n);
        }
        debug_assert_eq!(strip.rows, 0, "the sink wrote every row");
        job.calls.progress(total, total, "done");
        Ok(())
    }
}
