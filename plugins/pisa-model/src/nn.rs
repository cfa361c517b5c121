//! The layers the UNet, VAE and text encoder are made of, LoRA-aware: an adapter is either
//! merged into a layer's weight when it is built (`W + s·B·A`, no cost at run time) or kept
//! beside it and applied at run time with a scale per batch item, so one batch can run the
//! same layer with and without the adapter (PiSA-SR's ε_pix and ε_full in one pass).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use tessera_kernels::bf16::{self, Bf16Conv, Bf16Matrix};

use crate::error::{ModelError, Result};
pub use crate::norm::GroupNorm;
use crate::weights::{Precision, Vb};

/// What a forward pass needs besides its input.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// The run-time adapter's scale for each batch item, shape `[batch]` (f32); `None` runs
    /// without it.
    pub lora: Option<Tensor>,
    /// The most bytes one attention score matrix may take; queries are processed in chunks
    /// that fit (at least one query row at a time).
    pub attention_bytes: usize,
    /// Statistics shared by the GroupNorms of a tiled pass (the VAE's); `None`: each forward
    /// normalises with its own input's.
    pub norm: Option<std::sync::Arc<crate::norm::SharedNorm>>,
    /// The most bytes a convolution's unfolded input (candle's im2col: input channels × k² per
    /// output pixel) may take; larger convolutions run in bands of output rows.
    pub conv_bytes: usize,
    /// Whether 3×3 convolutions may run by Winograd F(4,3) (a little less precise than
    /// candle's im2col: about 1e-6 relative per convolution, where im2col is at float rounding).
    pub winograd: bool,
}

impl Default for Ctx {
    fn default() -> Ctx {
        Ctx { lora: None, attention_bytes: 256 << 20, norm: None, conv_bytes: 128 << 20, winograd: true }
    }
}

/// A low-rank adapter of one layer: `A` `[r, in]` or `[r, in, k, k]` (the layer's kernel,
/// stride and padding), `B` `[out, r]` or `[out, r, 1, 1]`, and `scale` = α / r.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl Adapter {
    /// `scale · B·A`, shaped like the layer's weight.
    pub fn delta(&self, weight_shape: &[usize]) -> candle_core::Result<Tensor> {
        let r = self.a.dim(0)?;
        let out = self.b.dim(0)?;
        let a = self.a.reshape((r, self.a.elem_count() / r))?;
        let b = self.b.reshape((out, r))?;
        (b.matmul(&a)? * self.scale)?.reshape(weight_shape)
    }

    /// Checks the adapter fits a layer whose weight has `weight_shape` (PyTorch layout).
    fn check(&self, module: &str, weight_shape: &[usize]) -> Result<()> {
        let bad = |why: String| ModelError::Checkpoint { file: "LoRA".into(), why: format!("`{module}`: {why}") };
        let r = self.a.dim(0)?;
        let mut a_shape = weight_shape.to_vec();
        a_shape[0] = r;
        let b_shape: Vec<usize> = if weight_shape.len() == 4 { vec![weight_shape[0], r, 1, 1] } else { vec![weight_shape[0], r] };
        if self.a.dims() != a_shape.as_slice() {
            return Err(bad(format!("lora_A has shape {:?}, expected {a_shape:?} for a layer of {weight_shape:?}", self.a.dims())));
        }
        if self.b.dims() != b_shape.as_slice() {
            return Err(bad(format!("lora_B has shape {:?}, expected {b_shape:?}", self.b.dims())));
        }
        Ok(())
    }
}

/// One family of adapters (PiSA-SR's pixel or semantic LoRA), by module name
/// (`down_blocks.0.resnets.0.conv1`).
#[derive(Clone, Debug, Default)]
pub struct Family {
    pub name: String,
    pub layers: HashMap<String, Adapter>,
}

/// Which adapters the layers built from a [`Vb`] merge and which they keep for run time.
#[derive(Debug, Default)]
pub struct LoraPlan {
    pub merge: Vec<Family>,
    pub runtime: Option<Family>,
    used: Mutex<BTreeSet<String>>,
}

impl LoraPlan {
    pub fn new(merge: Vec<Family>, runtime: Option<Family>) -> LoraPlan {
        LoraPlan { merge, runtime, used: Mutex::default() }
    }

    /// The weight of module `name` with the merged families added, and its run-time adapter.
    fn adapt(&self, name: &str, weight: Tensor) -> Result<(Tensor, Option<Adapter>)> {
        let mut w = weight;
        let mut touched = false;
        for family in &self.merge {
            if let Some(ad) = family.layers.get(name) {
                ad.check(name, w.dims())?;
                w = (&w + ad.delta(w.dims())?)?;
                touched = true;
            }
        }
        let runtime = self.runtime.as_ref().and_then(|f| f.layers.get(name)).cloned();
        if let Some(ad) = &runtime {
            ad.check(name, w.dims())?;
            touched = true;
        }
        if touched {
            self.used.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string());
        }
        Ok((w, runtime))
    }

    /// Fails naming an adapted module that no layer of the model has.
    pub fn check_all_used(&self) -> Result<()> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        for family in self.merge.iter().chain(self.runtime.as_ref()) {
            let mut names: Vec<&String> = family.layers.keys().filter(|k| !used.contains(*k)).collect();
            names.sort();
            if let Some(name) = names.first() {
                return Err(ModelError::Checkpoint {
                    file: family.name.clone(),
                    why: format!("LoRA module `{name}` is not an adaptable layer of this UNet"),
                });
            }
        }
        Ok(())
    }
}

/// A layer's weight matrix as its products use it.
#[derive(Clone, Debug)]
enum Matrix {
    /// On the model's device in f32, or in bf16 on a GPU (products in bf16, results f32).
    Tensor(Tensor),
    /// A linear layer's, bf16 packed for the CPU's bf16 kernels.
    Packed(Arc<Bf16Matrix>),
    /// A convolution's, bf16 packed for the CPU's bf16 convolutions.
    PackedConv(Arc<Bf16Conv>),
}

impl Matrix {
    fn keep(w: Tensor, precision: Precision) -> Result<Matrix> {
        Ok(match precision {
            Precision::F32 => Matrix::Tensor(w),
            Precision::Bf16 if w.device().is_cpu() => {
                let n = w.dim(0)?;
                let k = w.elem_count() / n.max(1);
                Matrix::Packed(Arc::new(Bf16Matrix::from_rows(&w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, n, k)))
            }
            Precision::Bf16 => Matrix::Tensor(w.to_dtype(DType::BF16)?),
        })
    }

    /// [`Matrix::keep`] for a convolution's OIHW weight.
    fn keep_conv(w: Tensor, precision: Precision) -> Result<Matrix> {
        if precision == Precision::Bf16 && w.device().is_cpu() {
            let (o, c, k, _) = w.dims4()?;
            let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            return Ok(Matrix::PackedConv(Arc::new(Bf16Conv::from_oihw(&values, o, c, k))));
        }
        Matrix::keep(w, precision)
    }

    /// The weights as f32 values in PyTorch's layout, flattened (the bf16 values, exactly).
    fn to_f32(&self) -> candle_core::Result<Vec<f32>> {
        match self {
            Matrix::Tensor(w) => w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>(),
            Matrix::Packed(w) => Ok(w.to_rows()),
            Matrix::PackedConv(w) => Ok(w.to_oihw()),
        }
    }
}

/// `x` in `like`'s dtype, the product's result back in f32 (no-ops in f32 precision).
fn as_dtype_of(x: &Tensor, like: &Tensor) -> candle_core::Result<Tensor> {
    x.to_dtype(like.dtype())
}

/// A bias kept as host values too, for the CPU's packed products.
fn host_bias(b: &Option<Tensor>, w: &Matrix) -> Result<Option<Vec<f32>>> {
    Ok(match (b, w) {
        (Some(b), Matrix::Packed(_) | Matrix::PackedConv(_)) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        _ => None,
    })
}

/// `x·Wᵀ + b`, plus the run-time adapter's `s·B·A·x` scaled per batch item.
#[derive(Clone, Debug)]
pub struct Linear {
    w: Matrix,
    outputs: usize,
    b: Option<Tensor>,
    b_host: Option<Vec<f32>>,
    lora: Option<Adapter>,
}

impl Linear {
    pub fn load(vb: &Vb, lora: Option<&LoraPlan>, input: usize, output: usize, bias: bool) -> Result<Linear> {
        let w = vb.get("weight", &[output, input])?;
        let b = if bias { Some(vb.get("bias", &[output])?) } else { None };
        let (w, lora) = match lora {
            Some(plan) => plan.adapt(vb.prefix(), w)?,
            None => (w, None),
        };
        let w = Matrix::keep(w, vb.precision())?;
        let b_host = host_bias(&b, &w)?;
        Ok(Linear { w, outputs: output, b, b_host, lora })
    }

    /// `x`: `[batch, …, in]`.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let input = *dims.last().expect("rank ≥ 1");
        let rows = x.elem_count() / input;
        let x2 = x.reshape((rows, input))?;
        let mut y = match &self.w {
            Matrix::Tensor(w) => {
                let y = as_dtype_of(&x2, w)?.matmul(&w.t()?)?.to_dtype(x.dtype())?;
                match &self.b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            Matrix::Packed(w) => {
                let y = tessera_kernels::winograd::with_slice(&x2, |xs| bf16::matmul(xs, rows, w, self.b_host.as_deref()))?;
                Tensor::from_vec(y, (rows, self.outputs), x.device())?
            }
            Matrix::PackedConv(_) => unreachable!("a linear layer keeps no convolution weights"),
        };
        if let (Some(ad), Some(scales)) = (&self.lora, &ctx.lora) {
            let batch = dims[0];
            let extra = x2.matmul(&ad.a.t()?)?.matmul(&ad.b.t()?)?;
            let extra = extra.reshape((batch, rows / batch, ()))?.broadcast_mul(&(scales * ad.scale)?.reshape((batch, 1, 1))?)?;
            y = (y.reshape((batch, rows / batch, ()))? + extra)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank ≥ 1") = self.outputs;
        y.reshape(out_dims)
    }
}

/// A 2-D convolution (PyTorch OIHW weight), LoRA-aware like [`Linear`].
#[derive(Clone, Debug)]
pub struct Conv2d {
    w: Matrix,
    /// `[out, in, k, k]`.
    shape: [usize; 4],
    b: Option<Tensor>,
    b_host: Option<Vec<f32>>,
    stride: usize,
    padding: usize,
    lora: Option<Adapter>,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn load(vb: &Vb, lora: Option<&LoraPlan>, input: usize, output: usize, kernel: usize, stride: usize, padding: usize) -> Result<Conv2d> {
        let w = vb.get("weight", &[output, input, kernel, kernel])?;
        let b = Some(vb.get("bias", &[output])?);
        let (w, lora) = match lora {
            Some(plan) => plan.adapt(vb.prefix(), w)?,
            None => (w, None),
        };
        let w = Matrix::keep_conv(w, vb.precision())?;
        let b_host = host_bias(&b, &w)?;
        Ok(Conv2d { w, shape: [output, input, kernel, kernel], b, b_host, stride, padding, lora })
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        if let Some(y) = self.winograd_conv(x, ctx)? {
            return Ok(y);
        }
        let w = match &self.w {
            Matrix::PackedConv(w) => return self.packed_conv(x, w, ctx),
            Matrix::Tensor(w) => w,
            Matrix::Packed(_) => unreachable!("a convolution keeps convolution weights"),
        };
        let y = banded_conv(&as_dtype_of(x, w)?, w, self.padding, self.stride, ctx.conv_bytes)?.to_dtype(x.dtype())?;
        let y = match &self.b {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
            None => y,
        };
        self.add_adapter_beside(x, y, ctx)
    }

    /// `y` plus the run-time adapter's rank-r convolution of `x`, scaled per batch item
    /// (`y` itself without an adapter or scales).
    fn add_adapter_beside(&self, x: &Tensor, y: Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let (Some(ad), Some(scales)) = (&self.lora, &ctx.lora) else { return Ok(y) };
        let batch = x.dim(0)?;
        let extra = banded_conv(x, &ad.a, self.padding, self.stride, ctx.conv_bytes)?.conv2d(&ad.b, 0, 1, 1, 1)?;
        y + extra.broadcast_mul(&(scales * ad.scale)?.reshape((batch, 1, 1, 1))?)?
    }

    /// Runs `conv` on each batch item of `x` with the weights made for its scale (`convs`,
    /// one per distinct value of `scales`), giving `[batch, out, ho, wo]`.
    fn per_item<C>(x: &Tensor, scales: &[f32], convs: &[(f32, C)], out: (usize, usize, usize), conv: impl Fn(&C, &[f32]) -> Vec<f32>) -> candle_core::Result<Tensor> {
        let (batch, c, h, w) = x.dims4()?;
        let x = x.contiguous()?;
        let y = tessera_kernels::winograd::with_slice(&x, |xs| {
            let mut y = Vec::with_capacity(batch * out.0 * out.1 * out.2);
            for (item, s) in xs.chunks(c * h * w).zip(scales) {
                let weights = &convs.iter().find(|(t, _)| t == s).expect("weights for every scale").1;
                y.extend(conv(weights, item));
            }
            y
        })?;
        Tensor::from_vec(y, (batch, out.0, out.1, out.2), x.device())
    }

    /// Each batch item's scale of the run-time adapter (zeros without one), and the f32 OIHW
    /// weights with the adapter merged, one set for each distinct scale: merged per item, an
    /// adapter costs a weight transform or packing instead of a rank-r convolution beside the
    /// layer, which would unfold the whole input (im2col: 9 × channels a pixel) for r outputs.
    fn item_weights(&self, batch: usize, ctx: &Ctx) -> candle_core::Result<(Vec<f32>, Vec<(f32, Vec<f32>)>)> {
        let scales: Vec<f32> = match (&self.lora, &ctx.lora) {
            (Some(_), Some(s)) => s.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            _ => vec![0.0; batch],
        };
        if scales.len() != batch {
            candle_core::bail!("{} adapter scales for a batch of {batch}", scales.len());
        }
        let base = self.w.to_f32()?;
        let delta = match &self.lora {
            Some(ad) if scales.iter().any(|s| *s != 0.0) => Some(ad.delta(&self.shape)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            _ => None,
        };
        let mut sets: Vec<(f32, Vec<f32>)> = Vec::new();
        for &s in &scales {
            if sets.iter().any(|(t, _)| *t == s) {
                continue;
            }
            let weights = match &delta {
                Some(d) if s != 0.0 => base.iter().zip(d).map(|(w, d)| w + s * d).collect(),
                _ => base.clone(),
            };
            sets.push((s, weights));
        }
        Ok((scales, sets))
    }

    /// The convolution, bias and run-time adapter by the CPU's bf16 convolutions (direct on
    /// AMX, else im2col, in bands of `ctx.conv_bytes`).
    fn packed_conv(&self, x: &Tensor, w: &Arc<Bf16Conv>, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let (batch, c, h, wd) = x.dims4()?;
        let [o, _, k, _] = self.shape;
        if h + 2 * self.padding < k || wd + 2 * self.padding < k {
            candle_core::bail!("a {k}×{k} convolution on a {h}×{wd} input");
        }
        let shape = bf16::ConvShape { channels: c, height: h, width: wd, kernel: k, stride: self.stride, padding: self.padding };
        let (ho, wo) = shape.output();
        let zeros;
        let bias = match &self.b_host {
            Some(b) => b.as_slice(),
            None => {
                zeros = vec![0f32; o];
                &zeros
            }
        };
        // The adapter merged per item where the image is large enough to pay for packing the
        // merged weights; beside the layer below that (its unfolded input is small there).
        let merge = h * wd >= WINOGRAD_MIN_PIXELS;
        let (scales, convs): (Vec<f32>, Vec<(f32, Arc<Bf16Conv>)>) = if merge && self.lora.is_some() && ctx.lora.is_some() {
            let (scales, sets) = self.item_weights(batch, ctx)?;
            let convs = sets.into_iter().map(|(s, weights)| (s, if s == 0.0 { w.clone() } else { Arc::new(Bf16Conv::from_oihw(&weights, o, c, k)) })).collect();
            (scales, convs)
        } else {
            (vec![0.0; batch], vec![(0.0, w.clone())])
        };
        let y = Self::per_item(x, &scales, &convs, (o, ho, wo), |conv, item| bf16::conv2d(item, shape, conv, bias, ctx.conv_bytes))?;
        if merge {
            Ok(y)
        } else {
            self.add_adapter_beside(x, y, ctx)
        }
    }
}

impl Conv2d {
    /// The convolution with its bias and run-time adapter by Winograd F(4,3)
    /// ([`tessera_kernels::nchw`]), for the 3×3, stride-1 convolutions of f32 CPU activations
    /// large enough that transforming the weights (on each call: kept transformed they would
    /// take 4× their memory) costs little against the products; `None` for the rest.
    ///
    /// The adapter is merged into the weights a batch item at a time ([`Conv2d::item_weights`]).
    fn winograd_conv(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Option<Tensor>> {
        let (batch, c, h, w) = x.dims4()?;
        let [o, _, k, _] = self.shape;
        if !ctx.winograd || k != 3 || self.stride != 1 || self.padding != 1 || h * w < WINOGRAD_MIN_PIXELS || !x.device().is_cpu() || x.dtype() != DType::F32 {
            return Ok(None);
        }
        // bf16 weights on a CPU with AMX: its direct convolution beats Winograd in f32.
        if matches!(self.w, Matrix::PackedConv(_)) && bf16::Kernel::best() == bf16::Kernel::Amx {
            return Ok(None);
        }
        let bias = match &self.b {
            Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            None => vec![0.0; o],
        };
        let (scales, sets) = self.item_weights(batch, ctx)?;
        let convs: Vec<(f32, tessera_kernels::winograd::Winograd)> =
            sets.into_iter().map(|(s, weights)| (s, tessera_kernels::winograd::Winograd::f4_from_oihw(&weights, bias.clone(), o, c))).collect();
        Ok(Some(Self::per_item(x, &scales, &convs, (o, h, w), |conv, item| tessera_kernels::nchw::conv3x3(conv, item, h, w, ctx.conv_bytes))?))
    }
}

/// Below this many pixels (a 32² latent) a 3×3 convolution stays on candle's im2col: the
/// per-call weight transform would weigh against the products, and the UNet's deepest
/// levels (1280 channels at 16² and 8²) are all weights.
const WINOGRAD_MIN_PIXELS: usize = 32 * 32;

/// `x.conv2d(w, padding, stride)`, in bands of output rows whose unfolded input stays within
/// `bytes` (each band padded with the zeros the whole would see, so the result is the same).
pub fn banded_conv(x: &Tensor, w: &Tensor, padding: usize, stride: usize, bytes: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let k = w.dim(2)?;
    if h + 2 * padding < k {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let (ho, wo) = ((h + 2 * padding - k) / stride + 1, (wd + 2 * padding - k) / stride + 1);
    let unfolded = b * c * k * k * ho * wo * DType::F32.size_in_bytes();
    if k == 1 || unfolded <= bytes {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let rows = (ho * bytes / unfolded).clamp(1, ho);
    let mut bands = Vec::with_capacity(ho.div_ceil(rows));
    for r0 in (0..ho).step_by(rows) {
        let r1 = (r0 + rows).min(ho);
        // Input rows r0·s − p .. (r1 − 1)·s − p + k, the part outside the image zeros.
        let (lo, hi) = ((r0 * stride) as isize - padding as isize, ((r1 - 1) * stride + k) as isize - padding as isize);
        let (top, bottom) = ((-lo).max(0) as usize, (hi - h as isize).max(0) as usize);
        let (lo, hi) = (lo.max(0) as usize, (hi as usize).min(h));
        let band = x.narrow(2, lo, hi - lo)?.pad_with_zeros(2, top, bottom)?.pad_with_zeros(3, padding, padding)?;
        bands.push(band.conv2d(w, 0, stride, 1, 1)?);
    }
    Tensor::cat(&bands, 2)
}

pub fn group_norm(vb: &Vb, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    GroupNorm::load(vb, groups, channels, eps)
}

pub fn layer_norm(vb: &Vb, channels: usize, eps: f64) -> Result<candle_nn::LayerNorm> {
    let w = vb.get("weight", &[channels])?;
    let b = vb.get("bias", &[channels])?;
    Ok(candle_nn::LayerNorm::new(w, b, eps))
}

/// Multi-head scaled dot-product attention, `q` `[batch, n_q, heads·d]`, `k` and `v`
/// `[batch, n_k, heads·d]`, with an optional additive mask `[n_q, n_k]`. Queries run in
/// chunks so that no score matrix exceeds `ctx.attention_bytes`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>, ctx: &Ctx) -> candle_core::Result<Tensor> {
    let (batch, n_q, inner) = q.dims3()?;
    let n_k = k.dim(1)?;
    let d = inner / heads;
    if mask.is_none() && q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32) {
        // The blocked kernel: scores in cache, no per-head copies, vectorised exponentials.
        let shape = tessera_kernels::attention::Shape { batch, n_q, n_k, heads, d };
        let scale = (d as f32).powf(-0.5);
        let out = tessera_kernels::winograd::with_slice(q, |q| {
            tessera_kernels::winograd::with_slice(k, |k| {
                tessera_kernels::winograd::with_slice(v, |v| tessera_kernels::attention::attention(q, k, v, shape, scale, ctx.attention_bytes))
            })
        })???;
        return Tensor::from_vec(out, (batch, n_q, inner), q.device());
    }
    let split = |t: &Tensor, n: usize| t.reshape((batch, n, heads, d))?.transpose(1, 2)?.contiguous()?.reshape((batch * heads, n, d));
    let q = (split(q, n_q)? * (d as f64).powf(-0.5))?;
    let kt = split(k, n_k)?.t()?.contiguous()?;
    let v = split(v, n_k)?;
    let row_bytes = batch * heads * n_k * DType::F32.size_in_bytes();
    let chunk = (ctx.attention_bytes / row_bytes.max(1)).clamp(1, n_q);
    let mut parts = Vec::with_capacity(n_q.div_ceil(chunk));
    for start in (0..n_q).step_by(chunk) {
        let len = chunk.min(n_q - start);
        let mut scores = q.narrow(1, start, len)?.matmul(&kt)?;
        if let Some(m) = mask {
            scores = scores.broadcast_add(&m.narrow(0, start, len)?)?;
        }
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        parts.push(p.matmul(&v)?);
    }
    let out = if parts.len() == 1 { parts.pop().expect("one") } else { Tensor::cat(&parts, 1)? };
    out.reshape((batch, heads, n_q, d))?.transpose(1, 2)?.contiguous()?.reshape((batch, n_q, inner))
}

/// GroupNorm then SiLU, the step before most convolutions here.
pub fn norm_silu(norm: &GroupNorm, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
    norm.forward_silu(x, ctx.norm.as_ref())
}

/// GEGLU (diffusers'): the last dimension's first half times GELU (erf form) of its second.
pub fn geglu(x: &Tensor) -> candle_core::Result<Tensor> {
    let n = x.dim(D::Minus1)? / 2;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1") = n;
    if x.device().is_cpu() && x.dtype() == DType::F32 && n > 0 {
        let y = tessera_kernels::winograd::with_slice(x, |xs| tessera_kernels::elementwise::geglu(xs, n))?;
        return Tensor::from_vec(y, dims, x.device());
    }
    x.narrow(D::Minus1, 0, n)? * x.narrow(D::Minus1, n, n)?.gelu_erf()?
}

/// diffusers' `Downsample2D` with padding 0 pads one zero row and column at the bottom and
/// right before its stride-2 convolution (with padding 1 the convolution pads itself).
pub fn pad_for_downsample(x: &Tensor, padding: usize) -> candle_core::Result<Tensor> {
    if padding == 0 {
        x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)
    } else {
        Ok(x.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A convolution with a run-time adapter scaled per batch item: every path that merges
    /// the adapter per item (Winograd, the bf16 convolutions) equals the f32 im2col path with
    /// the adapter beside the layer.
    #[test]
    fn run_time_adapters_merged_per_item_equal_the_adapter_beside() {
        let dev = Device::Cpu;
        let (c, o, r) = (6, 5, 2);
        // Large enough to merge the adapter per item; small enough to keep it beside.
        for hw in [40, 12] {
        let x = Tensor::randn(0f32, 1.0, (3, c, hw, hw), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.3, (o, c, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, o, &dev).unwrap();
        let lora = Adapter { a: Tensor::randn(0f32, 0.3, (r, c, 3, 3), &dev).unwrap(), b: Tensor::randn(0f32, 0.3, (o, r, 1, 1), &dev).unwrap(), scale: 0.5 };
        let conv = |precision| {
            let w = Matrix::keep_conv(w.clone(), precision).unwrap();
            let b_host = host_bias(&Some(b.clone()), &w).unwrap();
            Conv2d { w, shape: [o, c, 3, 3], b: Some(b.clone()), b_host, stride: 1, padding: 1, lora: Some(lora.clone()) }
        };
        let ctx = Ctx { lora: Some(Tensor::new(&[0f32, 1.0, 0.25], &dev).unwrap()), ..Ctx::default() };
        let im2col = Ctx { winograd: false, ..ctx.clone() };
        let beside = conv(Precision::F32).forward(&x, &im2col).unwrap();
        let max_diff = |y: &Tensor| (y - &beside).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let d = max_diff(&conv(Precision::F32).forward(&x, &ctx).unwrap());
        assert!(d < 1e-4, "f32 Winograd: {d}");
        for (name, ctx) in [("bf16", &ctx), ("bf16 without Winograd", &im2col)] {
            let d = max_diff(&conv(Precision::Bf16).forward(&x, ctx).unwrap());
            assert!(d > 1e-5 && d < 5e-2, "{name}, {hw}²: {d}");
        }
        }
    }

    #[test]
    fn banded_convolutions_equal_the_whole() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 17, 11), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 3, 3, 3), &dev).unwrap();
        for (padding, stride) in [(1, 1), (0, 2), (1, 2), (0, 1)] {
            let whole = x.conv2d(&w, padding, stride, 1, 1).unwrap();
            for bytes in [1, 3000, 20_000] {
                let banded = banded_conv(&x, &w, padding, stride, bytes).unwrap();
                assert_eq!(banded.dims(), whole.dims());
                let d = (&banded - &whole).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-5, "padding {padding} stride {stride} bytes {bytes}: {d}");
            }
        }
    }
}
