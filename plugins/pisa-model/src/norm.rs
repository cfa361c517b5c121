//! GroupNorm, and the statistics a tiled network shares so that every tile normalises with the
//! same numbers (DESIGN.md §5): a tile run normalises each group with its own mean and
//! variance, which tiles of different content (sky, foliage) would not share, and the tiles
//! would drift in tone. [`SharedNorm`] makes the GroupNorms of a tiled pass either gather the
//! sums of every group over each tile's core (its own pixels, halos excluded, so each pixel of
//! the image counts once) or normalise with statistics gathered before: whole-image ones.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use parking_lot::Mutex;

use crate::error::Result;
use crate::weights::Vb;

/// GroupNorm (PyTorch's: biased variance over each group's channels and pixels, then the
/// per-channel affine), which uses the context's shared statistics when it has them.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    local: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn load(vb: &Vb, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
        let weight = vb.get("weight", &[channels])?;
        let bias = vb.get("bias", &[channels])?;
        let local = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(GroupNorm { local, weight, bias, groups, eps })
    }

    pub fn forward(&self, x: &Tensor, shared: Option<&Arc<SharedNorm>>) -> candle_core::Result<Tensor> {
        self.forward_act(x, shared, false)
    }

    /// GroupNorm then SiLU, as one pass over the normalised values on the CPU.
    pub fn forward_silu(&self, x: &Tensor, shared: Option<&Arc<SharedNorm>>) -> candle_core::Result<Tensor> {
        self.forward_act(x, shared, true)
    }

    fn forward_act(&self, x: &Tensor, shared: Option<&Arc<SharedNorm>>, silu: bool) -> candle_core::Result<Tensor> {
        match shared {
            None => self.local_forward(x, silu),
            Some(s) => s.forward(self, x, silu),
        }
    }

    /// Normalised with `x`'s own statistics.
    fn local_forward(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        if !fused(x) {
            let y = self.local.forward(x)?;
            return if silu { y.silu() } else { Ok(y) };
        }
        let (b, c) = (x.dim(0)?, x.dim(1)?);
        let (w, bias): (Vec<f32>, Vec<f32>) = (self.weight.to_vec1()?, self.bias.to_vec1()?);
        let y = tessera_kernels::winograd::with_slice(x, |xs| {
            tessera_kernels::elementwise::group_norm(xs, b, c, x.elem_count() / (b * c).max(1), self.groups, self.eps, &w, &bias, silu)
        })?;
        Tensor::from_vec(y, x.shape(), x.device())
    }

    /// `x` normalised with per-(item, group) `mean` and `var` `[batch][groups]`.
    fn apply(&self, x: &Tensor, stats: &[Vec<GroupStats>], silu: bool) -> candle_core::Result<Tensor> {
        let (b, c, _, _) = x.dims4()?;
        let per = c / self.groups;
        let w: Vec<f32> = self.weight.to_vec1()?;
        let bias: Vec<f32> = self.bias.to_vec1()?;
        let (mut scale, mut shift) = (Vec::with_capacity(b * c), Vec::with_capacity(b * c));
        for item in stats.iter().take(b) {
            for ch in 0..c {
                let g = item[ch / per];
                let s = w[ch] as f64 / (g.var + self.eps).sqrt();
                scale.push(s as f32);
                shift.push((bias[ch] as f64 - g.mean * s) as f32);
            }
        }
        if fused(x) {
            let y = tessera_kernels::winograd::with_slice(x, |xs| {
                tessera_kernels::elementwise::channel_affine(xs, x.elem_count() / (b * c).max(1), &scale, &shift, silu)
            })?;
            return Tensor::from_vec(y, x.shape(), x.device());
        }
        let scale = Tensor::from_vec(scale, (b, c, 1, 1), x.device())?;
        let shift = Tensor::from_vec(shift, (b, c, 1, 1), x.device())?;
        let y = x.broadcast_mul(&scale)?.broadcast_add(&shift)?;
        if silu { y.silu() } else { Ok(y) }
    }
}

/// Whether the one-pass CPU kernels take `x` (f32 on the CPU; candle's ops otherwise).
fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 3
}

/// The mean and (biased) variance of one group, and how many values they cover.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GroupStats {
    pub mean: f64,
    pub var: f64,
    pub count: f64,
}

impl GroupStats {
    /// The statistics of the union of two disjoint sets (Chan et al.'s pairwise update, exact
    /// where sums of squares would cancel).
    pub fn merge(self, o: GroupStats) -> GroupStats {
        let n = self.count + o.count;
        if n == 0.0 {
            return self;
        }
        let d = o.mean - self.mean;
        let mean = self.mean + d * o.count / n;
        let m2 = self.var * self.count + o.var * o.count + d * d * self.count * o.count / n;
        GroupStats { mean, var: m2 / n, count: n }
    }
}

/// Where a tile's own pixels lie in its input, in the input's pixels, as `(y0, y1, x0, x1)`; a
/// layer at another resolution scales it by its size over the input's (exact when the tile's
/// offsets are multiples of the network's total down- or upsampling).
#[derive(Clone, Copy, Debug)]
pub struct Core {
    pub input: (usize, usize),
    pub rows: (usize, usize),
    pub cols: (usize, usize),
    /// Where the tile's input starts in the whole image's latent grid, and that grid's size
    /// (for the mid-block attention's keys and values, at latent resolution).
    pub origin: (usize, usize),
    pub grid: (usize, usize),
}

/// The mid-block attention's keys and values of every latent pixel of the image, `[tokens,
/// channels]` each, row-major over the latent grid.
#[derive(Clone, Debug)]
pub struct KeysValues {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub channels: usize,
}

/// One GroupNorm's statistics, `[batch][groups]`.
pub type NormStats = Vec<Vec<GroupStats>>;

/// What a tiled pass knows and gathers, by barrier: the n-th GroupNorm or mid-block attention
/// a tile's forward meets is barrier n (the network runs them in the same order in every
/// tile).
#[derive(Clone, Debug, Default)]
pub struct Barriers {
    /// Each GroupNorm's whole-image statistics (`None`: not known; the tile's own are used).
    pub norms: Vec<Option<NormStats>>,
    /// The mid-block attention's whole-image keys and values (`None`: within the tile).
    pub kv: Option<KeysValues>,
}

/// Marks the error that ends a tile's forward early, once the barrier a pass is for has
/// been gathered.
const STOPPED: &str = "tessera: tiled pass stopped at its barrier";

/// Whether `e` is a forward stopped at its pass's barrier (not a failure).
pub fn is_stop(e: &candle_core::Error) -> bool {
    e.to_string().contains(STOPPED)
}

/// Statistics shared by the GroupNorms of one tiled pass over an image.
#[derive(Debug)]
pub struct SharedNorm {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    known: Barriers,
    /// Gather barriers from this one on (`usize::MAX`: none).
    gather_from: usize,
    /// End the forward after gathering this barrier.
    stop_after: Option<usize>,
    gathered: Barriers,
    /// Whether the pass gathers the mid-block attention's keys and values (only where the
    /// whole image's will be attended over: they are the size of the latent image × 2 × 512
    /// channels, 1 GiB at 4096², which must not grow with the layer otherwise).
    gather_kv: bool,
    call: usize,
    core: Option<Core>,
}

impl SharedNorm {
    /// A pass that uses what is `known` and gathers every barrier from `gather_from` on,
    /// ending each tile's forward after barrier `stop_after` (the forward then fails with an
    /// error [`is_stop`] recognises); the attention's keys and values are gathered only with
    /// `gather_kv`.
    pub fn new(known: Barriers, gather_from: Option<usize>, stop_after: Option<usize>, gather_kv: bool) -> Arc<SharedNorm> {
        Arc::new(SharedNorm {
            state: Mutex::new(State { known, gather_from: gather_from.unwrap_or(usize::MAX), stop_after, gathered: Barriers::default(), gather_kv, call: 0, core: None }),
        })
    }

    /// The next forward is over a tile whose own pixels are `core`.
    pub fn begin_tile(&self, core: Core) {
        let mut s = self.state.lock();
        s.call = 0;
        s.core = Some(core);
    }

    /// What the pass gathered, over the whole image.
    pub fn gathered(&self) -> Barriers {
        self.state.lock().gathered.clone()
    }

    fn forward(&self, norm: &GroupNorm, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let mut s = self.state.lock();
        let call = s.call;
        s.call += 1;
        if call >= s.gather_from {
            let core = s.core.ok_or_else(|| candle_core::Error::Msg("shared GroupNorm statistics without a tile".into()))?;
            let tile = core_stats(x, core, norm.groups)?;
            let all = &mut s.gathered.norms;
            if all.len() <= call {
                all.resize(call + 1, None);
            }
            match &mut all[call] {
                slot @ None => *slot = Some(tile),
                Some(acc) => {
                    for (acc, t) in acc.iter_mut().zip(tile) {
                        for (a, g) in acc.iter_mut().zip(t) {
                            *a = a.merge(g);
                        }
                    }
                }
            }
        }
        if s.stop_after == Some(call) {
            candle_core::bail!("{STOPPED}");
        }
        match s.known.norms.get(call).and_then(Option::as_ref) {
            Some(stats) => norm.apply(x, stats, silu),
            None => norm.local_forward(x, silu),
        }
    }

    /// For the attention of a tile with keys `k` and values `v` `[1, tokens, channels]` over
    /// its input (at latent resolution): gathers its own pixels' when the pass gathers this
    /// barrier, and returns the keys and values to attend over: the whole image's when
    /// known, else the tile's.
    pub fn attention_kv(&self, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut s = self.state.lock();
        let call = s.call;
        s.call += 1;
        let core = s.core.ok_or_else(|| candle_core::Error::Msg("shared attention without a tile".into()))?;
        let (gh, gw) = core.grid;
        let (_, tokens, c) = k.dims3()?;
        let (ih, iw) = core.input;
        if tokens != ih * iw {
            candle_core::bail!("the mid-block attention runs at latent resolution: {tokens} tokens for a tile of {ih} × {iw}");
        }
        if call >= s.gather_from && s.gather_kv {
            let kv = s.gathered.kv.get_or_insert_with(|| KeysValues { k: vec![0.0; gh * gw * c], v: vec![0.0; gh * gw * c], channels: c });
            let (kt, vt): (Vec<f32>, Vec<f32>) = (k.flatten_all()?.to_vec1()?, v.flatten_all()?.to_vec1()?);
            for y in core.rows.0..core.rows.1 {
                let (from, to) = ((y * iw + core.cols.0) * c, ((core.origin.0 + y) * gw + core.origin.1 + core.cols.0) * c);
                let n = (core.cols.1 - core.cols.0) * c;
                kv.k[to..to + n].copy_from_slice(&kt[from..from + n]);
                kv.v[to..to + n].copy_from_slice(&vt[from..from + n]);
            }
        }
        if s.stop_after == Some(call) {
            candle_core::bail!("{STOPPED}");
        }
        match &s.known.kv {
            Some(kv) => Ok((Tensor::from_slice(&kv.k, (1, gh * gw, kv.channels), k.device())?, Tensor::from_slice(&kv.v, (1, gh * gw, kv.channels), k.device())?)),
            None => Ok((k.clone(), v.clone())),
        }
    }
}

/// Per item and group, the mean and variance of `x` over the tile's core.
fn core_stats(x: &Tensor, core: Core, groups: usize) -> candle_core::Result<Vec<Vec<GroupStats>>> {
    let (b, _, h, w) = x.dims4()?;
    let (ih, iw) = core.input;
    let (y0, y1) = (core.rows.0 * h / ih, core.rows.1 * h / ih);
    let (x0, x1) = (core.cols.0 * w / iw, core.cols.1 * w / iw);
    let part = x.narrow(2, y0, y1 - y0)?.narrow(3, x0, x1 - x0)?.to_dtype(DType::F32)?.contiguous()?;
    let part = part.reshape((b, groups, ()))?;
    let n = part.dim(2)?;
    let mean = part.mean_keepdim(2)?;
    let var = part.broadcast_sub(&mean)?.sqr()?.mean_keepdim(2)?;
    let (mean, var): (Vec<f32>, Vec<f32>) = (mean.flatten_all()?.to_vec1()?, var.flatten_all()?.to_vec1()?);
    Ok((0..b)
        .map(|i| (0..groups).map(|g| GroupStats { mean: mean[i * groups + g] as f64, var: var[i * groups + g] as f64, count: n as f64 }).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_statistics_are_the_whole_sets() {
        let a = [1.0, 2.0, 4.0];
        let b = [10.0, 12.0];
        let stats = |v: &[f64]| {
            let n = v.len() as f64;
            let m = v.iter().sum::<f64>() / n;
            GroupStats { mean: m, var: v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n, count: n }
        };
        let all: Vec<f64> = a.iter().chain(&b).copied().collect();
        let merged = stats(&a).merge(stats(&b));
        let whole = stats(&all);
        assert!((merged.mean - whole.mean).abs() < 1e-12 && (merged.var - whole.var).abs() < 1e-12 && merged.count == 5.0);
    }

    /// The keys and values are the size of the latent image: a pass that will not attend
    /// over the whole image must not gather them (at 4096² they were 1 GiB, growing with the
    /// layer, against the budget's promise).
    #[test]
    fn keys_and_values_are_gathered_only_when_used() {
        let dev = candle_core::Device::Cpu;
        let (k, v) = (Tensor::ones((1, 16, 8), candle_core::DType::F32, &dev).unwrap(), Tensor::zeros((1, 16, 8), candle_core::DType::F32, &dev).unwrap());
        let core = Core { input: (4, 4), rows: (0, 4), cols: (0, 4), origin: (0, 0), grid: (64, 64) };
        for gather_kv in [false, true] {
            let shared = SharedNorm::new(Barriers::default(), Some(0), None, gather_kv);
            shared.begin_tile(core);
            let (k2, _) = shared.attention_kv(&k, &v).unwrap();
            assert_eq!(k2.dims(), k.dims(), "with nothing known, a tile attends over its own");
            let kv = shared.gathered().kv;
            assert_eq!(kv.is_some(), gather_kv);
            if let Some(kv) = kv {
                assert_eq!((kv.k.len(), kv.k.iter().sum::<f32>()), (64 * 64 * 8, 16.0 * 8.0), "the tile's 16 tokens in the whole grid's keys");
            }
        }
    }
}
