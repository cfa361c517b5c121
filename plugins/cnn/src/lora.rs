//! LoRA adapters for convolution layers, merged into the weights at load (AdaptSR): an adapted
//! model has the base model's shapes and runs exactly as fast.
//!
//! An adapter file is safetensors with PEFT's naming, per adapted layer `L`:
//! `L.lora_A.weight` (r, in, k, k), applied as a k×k convolution with the layer's padding;
//! `L.lora_B.weight` (out, r, 1, 1), a 1×1 convolution; optionally `L.alpha` (a scalar; r when
//! absent). The layer then computes `conv(x, W) + (α/r)·conv(conv(x, A), B)`, which equals
//! `conv(x, W + ΔW)` with `ΔW[o,i,·,·] = (α/r) Σ_r B[o,r] A[r,i,·,·]`. Ranks may differ per
//! layer; layers an adapter does not name keep their weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};

pub struct LoraLayer {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

pub struct LoraAdapter {
    pub layers: HashMap<String, LoraLayer>,
}

fn bad(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

impl LoraAdapter {
    pub fn load(path: &Path, device: &Device) -> Result<LoraAdapter> {
        LoraAdapter::from_tensors(candle_core::safetensors::load(path, device)?)
    }

    pub fn from_tensors(mut tensors: HashMap<String, Tensor>) -> Result<LoraAdapter> {
        let names: Vec<String> = tensors
            .keys()
            .filter_map(|k| k.strip_suffix(".lora_A.weight").map(String::from))
            .collect();
        let mut layers = HashMap::new();
        for name in names {
            let a = tensors.remove(&format!("{name}.lora_A.weight")).expect("listed above").to_dtype(DType::F32)?;
            let b = tensors
                .remove(&format!("{name}.lora_B.weight"))
                .ok_or_else(|| bad(format!("LoRA layer `{name}` has lora_A but no lora_B")))?
                .to_dtype(DType::F32)?;
            let (r, _, _, _) = a.dims4()?;
            let (_, rb, kh, kw) = b.dims4()?;
            if rb != r || kh != 1 || kw != 1 {
                return Err(bad(format!("LoRA layer `{name}`: lora_B is {:?}, expected (out, {r}, 1, 1)", b.dims())));
            }
            let alpha = match tensors.remove(&format!("{name}.alpha")) {
                Some(t) => t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?.first().copied().unwrap_or(r as f64),
                None => r as f64,
            };
            layers.insert(name, LoraLayer { a, b, scale: alpha / r as f64 });
        }
        if let Some(stray) = tensors.keys().next() {
            return Err(bad(format!("unexpected tensor `{stray}` in a LoRA adapter")));
        }
        Ok(LoraAdapter { layers })
    }
}

impl LoraLayer {
    /// ΔW = scale · B·A, shaped like the layer's weight (out, in, k, k).
    pub fn delta(&self) -> Result<Tensor> {
        let (r, i, kh, kw) = self.a.dims4()?;
        let o = self.b.dim(0)?;
        let a = self.a.reshape((r, i * kh * kw))?;
        let b = self.b.reshape((o, r))?;
        (b.matmul(&a)? * self.scale)?.reshape((o, i, kh, kw))
    }

    /// The unmerged two-path computation's extra term: scale · conv(conv(x, A), B).
    pub fn apply(&self, x: &Tensor, padding: usize) -> Result<Tensor> {
        x.conv2d(&self.a, padding, 1, 1, 1)?.conv2d(&self.b, 0, 1, 1, 1)? * self.scale
    }
}

/// Adds each adapter's ΔW, times its strength, to the weights it names (a state dict keyed like
/// the model's, before any BatchNorm folding).
pub fn merge(weights: &mut HashMap<String, Tensor>, adapters: &[(&LoraAdapter, f64)]) -> Result<()> {
    for (adapter, strength) in adapters {
        for (name, layer) in &adapter.layers {
            let key = format!("{name}.weight");
            let w = weights.get(&key).ok_or_else(|| bad(format!("the model has no layer `{name}` to adapt")))?;
            let delta = layer.delta()?;
            if delta.dims() != w.dims() {
                return Err(bad(format!("LoRA for `{name}` makes a {:?} delta; the weight is {:?}", delta.dims(), w.dims())));
            }
            let merged = (w.to_dtype(DType::F32)? + (delta * *strength)?)?;
            weights.insert(key, merged);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn adapter(name: &str, o: usize, i: usize, k: usize, r: usize, alpha: Option<f32>, dev: &Device) -> LoraAdapter {
        let mut t = HashMap::new();
        t.insert(format!("{name}.lora_A.weight"), Tensor::randn(0f32, 0.3, (r, i, k, k), dev).unwrap());
        t.insert(format!("{name}.lora_B.weight"), Tensor::randn(0f32, 0.3, (o, r, 1, 1), dev).unwrap());
        if let Some(a) = alpha {
            t.insert(format!("{name}.alpha"), Tensor::new(&[a], dev).unwrap());
        }
        LoraAdapter::from_tensors(t).unwrap()
    }

    /// Merged equals the two-path computation, for several adapters with strengths, on the
    /// kernel sizes SRResNet has (9×9 first/last, 3×3 body and upsamplers).
    #[test]
    fn merged_equals_unmerged_two_path() -> Result<()> {
        let dev = Device::Cpu;
        for (o, i, k, r1, r2) in [(8, 5, 3, 2, 4), (3, 16, 9, 4, 1), (64, 3, 9, 4, 8)] {
            let x = Tensor::randn(0f32, 1.0, (1, i, 11, 13), &dev)?;
            let w = Tensor::randn(0f32, 0.3, (o, i, k, k), &dev)?;
            let first = adapter("conv", o, i, k, r1, Some(8.0), &dev);
            let second = adapter("conv", o, i, k, r2, None, &dev);
            let (s1, s2) = (0.7, -0.3);
            let mut weights = HashMap::from([("conv.weight".to_string(), w.clone())]);
            merge(&mut weights, &[(&first, s1), (&second, s2)])?;
            let merged = x.conv2d(&weights["conv.weight"], k / 2, 1, 1, 1)?;
            let two_path = ((x.conv2d(&w, k / 2, 1, 1, 1)? + (first.layers["conv"].apply(&x, k / 2)? * s1)?)?
                + (second.layers["conv"].apply(&x, k / 2)? * s2)?)?;
            // Within 1e-5 relative to the output's magnitude (f32 sums of up to 1296 terms).
            let scale = two_path.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
            let d = max_diff(&merged, &two_path) / scale;
            assert!(d <= 1e-5, "{o}x{i}x{k}: {d}");
        }
        Ok(())
    }

    #[test]
    fn refuses_what_it_cannot_merge() {
        let dev = Device::Cpu;
        let a = adapter("missing", 4, 4, 3, 2, None, &dev);
        let mut weights = HashMap::from([("conv.weight".to_string(), Tensor::zeros((4, 4, 3, 3), DType::F32, &dev).unwrap())]);
        assert!(merge(&mut weights, &[(&a, 1.0)]).unwrap_err().to_string().contains("no layer `missing`"));
        let wrong = adapter("conv", 4, 4, 5, 2, None, &dev);
        assert!(merge(&mut weights, &[(&wrong, 1.0)]).is_err());
        let only_a = HashMap::from([("x.lora_A.weight".to_string(), Tensor::zeros((2, 4, 3, 3), DType::F32, &dev).unwrap())]);
        assert!(LoraAdapter::from_tensors(only_a).is_err());
    }
}
