//! RRDBNet ×4 (ESRGAN, Wang et al. 2018; Real-ESRGAN's generator), keyed like BasicSR's
//! `RRDBNet`: conv_first, N residual-in-residual dense blocks (three dense blocks of five 3×3
//! convolutions each, LeakyReLU 0.2 after the first four, residuals scaled by 0.2), conv_body
//! (+ the first features), two nearest ×2 upsamplers each with a conv and LeakyReLU, conv_hr
//! with LeakyReLU, conv_last. Feature and growth widths and the block count are read from the
//! weights. Every convolution runs on channels-last padded activations ([`Padded`]).

use candle_core::{Device, Module, Result, Tensor};

use crate::conv_few::ConvFew;
use crate::layers::{ConvCl, Padded, Weights};
use crate::winograd::{output_len, Activation, Transformed};
use rayon::prelude::*;

const LEAKY: Activation<'static> = Activation::LeakyRelu(SLOPE as f32);

const SLOPE: f64 = 0.2;
const RESIDUAL_SCALE: f64 = 0.2;

/// A dense block: each conv sees the block input and every earlier conv's output.
struct Rdb {
    convs: Vec<ConvCl>,
}

impl Rdb {
    /// Band by band down the image, each convolution a band behind the one before it (a
    /// wavefront): a band's transformed input needs the previous convolution's outputs one
    /// tile row below it, which the band ahead has made. So no rows are computed twice (strips
    /// with 5 rows of context each side did 23 % more work at 256² and 34 % at 384²), and the
    /// transformed concatenation lives in a ring of five bands, which stays in the cache.
    /// `scratch` holds the buffers and the band (tile rows of 4 pixel rows a step).
    fn forward(&self, x: &Padded, scratch: &mut RdbScratch) -> Result<Padded> {
        let (h, w, pw) = (x.h, x.w, x.w + 2);
        let feat = x.t.dim(1)?;
        let grow = self.convs[0].out_channels();
        assert_eq!((h, w, feat, grow), (scratch.h, scratch.w, scratch.feat, scratch.grow), "the scratch buffers are for another shape");
        let (ty, band) = (h.div_ceil(4), scratch.band);
        let bands = ty.div_ceil(band);
        let RdbScratch { cat, outs, y, .. } = scratch;
        let out = crate::winograd::with_slice(&x.t, |input| {
            for step in 0..bands + STAGES - 1 {
                // Stage g transforms its input's channels for band step − g, then runs
                // convolution g + 1 on that band.
                for g in 0..STAGES {
                    let Some(b) = step.checked_sub(g).filter(|&b| b < bands) else { continue };
                    let rows = b * band..((b + 1) * band).min(ty);
                    let (done, rest) = outs.split_at_mut(g);
                    let new = match done.last() {
                        None => (input, feat, feat, 0),
                        Some(prev) => (prev.as_slice(), grow, grow, feat + (g - 1) * grow),
                    };
                    match rest.first_mut() {
                        Some(out) => self.convs[g].forward_adding_rows(cat, new, LEAKY, rows, out),
                        None => self.convs[g].forward_adding_rows(cat, new, Activation::None, rows, y),
                    }
                }
            }
            // Collected in place: no zeroing of the new buffer first.
            let n = (h + 3) * pw * feat;
            y[..n].par_iter().zip(input).map(|(y, x)| y * RESIDUAL_SCALE as f32 + x).collect::<Vec<f32>>()
        })?;
        Ok(Padded { t: Tensor::from_vec(out, ((h + 3) * pw, feat), x.t.device())?, h, w })
    }

    /// The same, all rows at once (the reference the tests hold `forward` to).
    /// Each convolution reads the block input and every earlier output: the concatenation
    /// exists only in the Winograd domain ([`Transformed`]), where each channel is transformed
    /// once, as it is produced, and each convolution reads the first C.
    #[cfg(test)]
    fn forward_whole(&self, x: &Padded) -> Result<Padded> {
        let (h, w) = (x.h, x.w);
        let feat = x.t.dim(1)?;
        let grow = (self.convs[4].in_channels() - feat) / 4;
        let mut cat = Transformed::new(h, w, feat + 4 * grow);
        let input = crate::winograd::with_slice(&x.t, |x| {
            cat.add(x, feat, feat, 0);
            x.to_vec()
        })?;
        for (k, conv) in self.convs[..4].iter().enumerate() {
            let y = conv.forward_transformed(&cat, LEAKY);
            cat.add(&y, grow, grow, feat + k * grow);
        }
        let mut y = self.convs[4].forward_transformed(&cat, Activation::None);
        for (y, x) in y.iter_mut().zip(&input) {
            *y = *y * RESIDUAL_SCALE as f32 + x;
        }
        Ok(Padded { t: Tensor::from_vec(y, ((h + 3) * (w + 2), feat), x.t.device())?, h, w })
    }
}

/// A dense block's working buffers, kept across the blocks of a forward pass: the shapes are
/// the same every time and every value read is written first (the zero borders never are),
/// so they need no clearing; fresh ones cost 22 MB of zeroing a block at 128².
struct RdbScratch {
    cat: Transformed,
    outs: Vec<Vec<f32>>,
    y: Vec<f32>,
    h: usize,
    w: usize,
    feat: usize,
    grow: usize,
    /// Tile rows a step covers.
    band: usize,
}

impl RdbScratch {
    fn new(h: usize, w: usize, feat: usize, grow: usize, band: usize) -> RdbScratch {
        let band = band.max(1);
        RdbScratch {
            cat: Transformed::ring(h, w, feat + 4 * grow, STAGES * band),
            outs: (0..4).map(|_| vec![0f32; output_len(h, w, 4, grow)]).collect(),
            y: vec![0f32; output_len(h, w, 4, feat)],
            h,
            w,
            feat,
            grow,
            band,
        }
    }
}

pub struct RrdbNet {
    conv_first: ConvCl,
    body: Vec<[Rdb; 3]>,
    conv_body: ConvCl,
    conv_up1: ConvCl,
    conv_up2: ConvCl,
    conv_hr: ConvCl,
    /// 64 → 3: a wide GEMM (Winograd would fill 3 of its 16 lanes).
    conv_last: ConvFew,
    /// Feature pixels per strip of the ×4 tail ([`TAIL_STRIP_PIXELS`]).
    tail_strip_pixels: usize,
    /// Tile rows a dense block's step covers ([`rdb_band`]).
    rdb_band: usize,
}

impl RrdbNet {
    pub fn load(weights: &Weights) -> Result<RrdbNet> {
        let conv = |name: &str| ConvCl::fast(&weights.conv(name, None)?);
        let num_block = (0..).take_while(|b| weights.0.contains_key(&format!("body.{b}.rdb1.conv1.weight"))).count();
        let body = (0..num_block)
            .map(|b| {
                let rdb = |r: usize| -> Result<Rdb> {
                    Ok(Rdb { convs: (1..=5).map(|c| conv(&format!("body.{b}.rdb{r}.conv{c}"))).collect::<Result<_>>()? })
                };
                Ok([rdb(1)?, rdb(2)?, rdb(3)?])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RrdbNet {
            conv_first: conv("conv_first")?,
            body,
            conv_body: conv("conv_body")?,
            conv_up1: conv("conv_up1")?,
            conv_up2: conv("conv_up2")?,
            conv_hr: conv("conv_hr")?,
            conv_last: ConvFew::new(&weights.conv("conv_last", None)?)?,
            tail_strip_pixels: TAIL_STRIP_PIXELS,
            rdb_band: rdb_band(),
        })
    }

    pub fn load_file(path: &std::path::Path, device: &Device) -> Result<RrdbNet> {
        RrdbNet::load(&Weights(candle_core::safetensors::load(path, device)?))
    }

    pub fn num_block(&self) -> usize {
        self.body.len()
    }

    /// (1, 3, h, w) RGB in [0, 1] → (1, 3, 4h, 4w), not clamped (the trained network
    /// overshoots [0, 1] a little). Call it inside [`crate::layers::in_pool`] (the tiler
    /// does): a dense block's wavefront runs thousands of short parallel loops.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_timed(x, &mut |_, _| {})
    }

    /// `forward`, telling `stage(name, seconds)` how long each part took (for profiling).
    pub fn forward_timed(&self, x: &Tensor, stage: &mut dyn FnMut(&str, f64)) -> Result<Tensor> {
        let mut lap = crate::layers::stopwatch(stage);
        let p = Padded::from_nchw(x)?;
        let feat = self.conv_first.forward(&p)?;
        let grow = self.body.first().map_or(0, |b| b[0].convs[0].out_channels());
        let mut scratch = RdbScratch::new(p.h, p.w, self.conv_first.out_channels(), grow, self.rdb_band);
        let mut h = feat.clone();
        for rrdb in &self.body {
            let mut y = h.clone();
            for rdb in rrdb {
                y = rdb.forward(&y, &mut scratch)?;
            }
            h = y.scale_add(RESIDUAL_SCALE, &h)?;
        }
        drop(scratch);
        let feat = feat.add(&self.conv_body.forward(&h)?)?;
        drop(h);
        lap("body");
        // The ×4 tail in strips of feature rows, each with TAIL_HALO rows of context on both
        // sides: its activations at the output resolution are the network's largest (64
        // channels at 16× the pixels), and strips keep them to a few MiB.
        let rows = (self.tail_strip_pixels / feat.w).clamp(TAIL_HALO, feat.h.max(TAIL_HALO));
        let mut strips = Vec::with_capacity(feat.h.div_ceil(rows));
        for r0 in (0..feat.h).step_by(rows) {
            let r1 = (r0 + rows).min(feat.h);
            let (a, b) = (r0.saturating_sub(TAIL_HALO), (r1 + TAIL_HALO).min(feat.h));
            let y = self.tail(&feat.rows(a, b)?)?;
            strips.push(y.narrow(2, 4 * (r0 - a), 4 * (r1 - r0))?);
        }
        let y = Tensor::cat(&strips, 2)?;
        lap("tail");
        Ok(y)
    }

    /// Features → the ×4 image (1, 3, 4h, 4w): upsample, conv, LeakyReLU, twice, then conv_hr
    /// with LeakyReLU and conv_last.
    fn tail(&self, feat: &Padded) -> Result<Tensor> {
        let u = self.conv_up1.forward_act(&feat.upsample2()?, LEAKY)?.upsample2()?;
        let u = self.conv_up2.forward_act(&u, LEAKY)?;
        let u = self.conv_hr.forward_act(&u, LEAKY)?;
        self.conv_last.forward_padded(&u)
    }
}

/// A dense block's five convolutions: the stages of its wavefront.
const STAGES: usize = 5;

/// Tile rows (4 pixel rows) a dense block's step covers: one for each thread, at least two.
/// The ring holds five bands of the transformed concatenation (0.9 MiB a tile row at 128²
/// width), which stay in the cache between their writing and their last read. Measured at
/// 128² on 2 threads (body, best of 4): bands of 1 tile row 1076 ms (one thread idles), 2
/// 629 ms, 4 709 ms; strips with halos (before) 884 ms.
fn rdb_band() -> usize {
    rayon::current_num_threads().max(2)
}

/// Feature rows of context a tail strip needs: through one 3×3 convolution at 2× and three at
/// 4×, an output row reaches feature rows up to two away.
const TAIL_HALO: usize = 2;

/// Feature pixels per tail strip: 8192 become 131072 output pixels, 32 MiB of 64 channels.
/// Fewer (4096) made the anime model's tail 15 % slower at 256² for 70 MB less.
const TAIL_STRIP_PIXELS: usize = 8192;

impl Module for RrdbNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        RrdbNet::forward(self, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-block RRDBNet of 8 features and growth 4 with random weights.
    fn tiny() -> Result<RrdbNet> {
        let dev = Device::Cpu;
        let mut w = std::collections::HashMap::new();
        let mut conv = |name: String, c: usize, o: usize| -> Result<()> {
            w.insert(format!("{name}.weight"), (Tensor::randn(0f32, 1f32, (o, c, 3, 3), &dev)? / (3.0 * c as f64).sqrt())?);
            w.insert(format!("{name}.bias"), (Tensor::randn(0f32, 1f32, o, &dev)? * 0.1)?);
            Ok(())
        };
        conv("conv_first".into(), 3, 8)?;
        for r in 1..=3 {
            for k in 1..=5 {
                conv(format!("body.0.rdb{r}.conv{k}"), 8 + 4 * (k - 1), if k == 5 { 8 } else { 4 })?;
            }
        }
        for name in ["conv_body", "conv_up1", "conv_up2", "conv_hr"] {
            conv(name.into(), 8, 8)?;
        }
        conv("conv_last".into(), 8, 3)?;
        RrdbNet::load(&Weights(w))
    }

    #[test]
    fn strips_equal_the_whole() -> Result<()> {
        let mut net = tiny()?;
        let x = Tensor::rand(0f32, 1f32, (1, 3, 47, 10), &Device::Cpu)?;
        let whole = net.forward(&x)?;
        // Tail strips of three feature rows (sixteen strips, the last one short); dense
        // blocks a tile row a step.
        net.tail_strip_pixels = 30;
        net.rdb_band = 1;
        let strips = net.forward(&x)?;
        assert_eq!(strips.dims(), [1, 3, 188, 40]);
        let diff = (&whole - strips)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = whole.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        // F(4,3) tiles fall on other pixels in a strip: equal within rounding, not bitwise.
        assert!(diff < 1e-5 * scale, "{diff} of {scale}");
        Ok(())
    }

    #[test]
    fn dense_blocks_band_by_band_equal_all_rows_at_once() -> Result<()> {
        let net = tiny()?;
        let rdb = &net.body[0][1];
        // 47 rows: 12 tile rows, the last one short.
        let x = Padded::from_nchw(&Tensor::randn(0f32, 1f32, (1, 8, 47, 21), &Device::Cpu)?)?;
        let whole = rdb.forward_whole(&x)?.t;
        let scale = whole.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        for band in [1, 2, 3, 5, 12, 100] {
            let mut scratch = RdbScratch::new(47, 21, 8, 4, band);
            // After another input through the same buffers, as a network's blocks use them.
            rdb.forward(&Padded::from_nchw(&Tensor::randn(0f32, 1f32, (1, 8, 47, 21), &Device::Cpu)?)?, &mut scratch)?;
            let banded = rdb.forward(&x, &mut scratch)?.t;
            let diff = (&whole - banded)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            // The same tiles and blocks, so the same arithmetic.
            assert!(diff <= 1e-6 * scale, "band {band}: {diff} of {scale}");
        }
        Ok(())
    }
}
