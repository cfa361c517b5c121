//! SRResNet / SRGAN generator (Ledig et al. 2017, as trained by krasserm/super-resolution):
//! conv 9×9 → PReLU, 16 residual blocks (conv → BN → PReLU → conv → BN, + input), conv → BN
//! (+ the first features), two ×2 pixel-shuffle upsamplers with PReLU, conv 9×9 → tanh.
//! BatchNorm (Keras ε = 1e-3, inference statistics) is folded into the convolution before
//! it at load, so a forward pass is convolutions and activations only.

use candle_core::{DType, Device, Module, Result, Tensor};

use crate::conv_few::ConvFew;
use crate::layers::{Conv, ConvCl, Padded, Weights};
use crate::winograd::Activation;

struct PRelu {
    /// (1, C, 1, 1)
    alpha: Tensor,
}

impl PRelu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let zeros = x.zeros_like()?;
        x.maximum(&zeros)? + x.minimum(&zeros)?.broadcast_mul(&self.alpha)?
    }
}

struct Block {
    conv1: ConvCl,
    /// PReLU slopes, one per channel, applied in conv1's output pass.
    alpha: Vec<f32>,
    conv2: ConvCl,
}

pub struct SrResNet {
    conv_first: Conv,
    prelu_first: PRelu,
    body: Vec<Block>,
    conv_body: ConvCl,
    /// The upsamplers' 64→256 convolutions, with their PReLU slopes repeated for each of the
    /// four sub-pixels: PReLU is per channel, so it can run before the pixel shuffle, in the
    /// convolution's output pass.
    conv_up1: ConvCl,
    alpha_up1: Vec<f32>,
    conv_up2: ConvCl,
    alpha_up2: Vec<f32>,
    conv_last: ConvFew,
}

/// PReLU slopes per channel `c` → per pre-shuffle channel `c·4 + k` (torch's pixel_shuffle order).
fn repeat4(alpha: &Tensor) -> Result<Vec<f32>> {
    Ok(alpha.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|&a| [a; 4]).collect())
}

fn prelu(weights: &Weights, name: &str) -> Result<PRelu> {
    let a = weights.get(&format!("{name}.weight"))?.to_dtype(DType::F32)?;
    let c = a.elem_count();
    Ok(PRelu { alpha: a.reshape((1, c, 1, 1))? })
}

impl SrResNet {
    /// Winograd F(4,3) everywhere but `conv_body`, which stays on F(2,3): that keeps the
    /// network within 1e-5 of TensorFlow (6.9e-6 on noise input; 9.4e-6 with `conv_body` on
    /// F(4,3) too, too close to the bound).
    pub fn load(weights: &Weights) -> Result<SrResNet> {
        let body = (0..16)
            .map(|i| {
                let alpha = prelu(weights, &format!("body.{i}.prelu"))?.alpha.flatten_all()?.to_vec1::<f32>()?;
                Ok(Block {
                    conv1: ConvCl::fast(&weights.conv(&format!("body.{i}.conv1"), Some(&format!("body.{i}.bn1")))?)?,
                    alpha,
                    conv2: ConvCl::fast(&weights.conv(&format!("body.{i}.conv2"), Some(&format!("body.{i}.bn2")))?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SrResNet {
            conv_first: weights.conv("conv_first", None)?,
            prelu_first: prelu(weights, "prelu_first")?,
            body,
            conv_body: ConvCl::from(&weights.conv("conv_body", Some("bn_body"))?)?,
            conv_up1: ConvCl::fast(&weights.conv("conv_up1", None)?)?,
            alpha_up1: repeat4(&prelu(weights, "prelu_up1")?.alpha)?,
            conv_up2: ConvCl::fast(&weights.conv("conv_up2", None)?)?,
            alpha_up2: repeat4(&prelu(weights, "prelu_up2")?.alpha)?,
            conv_last: ConvFew::new(&weights.conv("conv_last", None)?)?,
        })
    }

    pub fn load_file(path: &std::path::Path, device: &Device) -> Result<SrResNet> {
        SrResNet::load_adapted(path, &[], device)
    }

    /// Deep network interpolation (Wang et al., ESRGAN §3.4): one network whose every
    /// parameter (convolutions, BatchNorm statistics, PReLU) is `(1 − λ)·a + λ·b`. Valid for
    /// two networks of which one was fine-tuned from the other, as SRGAN was from SRResNet.
    pub fn load_interpolated(a: &std::path::Path, b: &std::path::Path, lambda: f64, device: &Device) -> Result<SrResNet> {
        let wa = candle_core::safetensors::load(a, device)?;
        let mut wb = candle_core::safetensors::load(b, device)?;
        let mut mixed = std::collections::HashMap::with_capacity(wa.len());
        for (key, ta) in wa {
            let tb = wb.remove(&key).ok_or_else(|| candle_core::Error::Msg(format!("`{key}` is in {} only", a.display())))?;
            let (ta, tb) = (ta.to_dtype(DType::F32)?, tb.to_dtype(DType::F32)?);
            mixed.insert(key, (&ta + ((tb - &ta)? * lambda)?)?);
        }
        SrResNet::load(&Weights(mixed))
    }

    /// Loads the weights and merges LoRA adapters (each with a strength) into them before
    /// BatchNorm is folded: the adapted network costs nothing extra at run time.
    pub fn load_adapted(path: &std::path::Path, adapters: &[(&crate::lora::LoraAdapter, f64)], device: &Device) -> Result<SrResNet> {
        let mut weights = candle_core::safetensors::load(path, device)?;
        crate::lora::merge(&mut weights, adapters)?;
        SrResNet::load(&Weights(weights))
    }

    /// (N, 3, h, w) RGB in [0, 1] → (N, 3, 4h, 4w) in [0, 1].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_timed(x, &mut |_, _| {})
    }

    /// `forward`, telling `stage(name, seconds)` how long each part took (for profiling).
    pub fn forward_timed(&self, x: &Tensor, stage: &mut dyn FnMut(&str, f64)) -> Result<Tensor> {
        let mut lap = crate::layers::stopwatch(stage);
        let x1 = self.prelu_first.forward(&self.conv_first.forward(x)?)?;
        lap("conv_first");
        let p1 = Padded::from_nchw(&x1)?;
        let mut h = p1.clone();
        for b in &self.body {
            let t = b.conv1.forward_act(&h, Activation::PRelu(&b.alpha))?;
            h = h.add(&b.conv2.forward(&t)?)?;
        }
        let h = self.conv_body.forward(&h)?.add(&p1)?;
        lap("body");
        let h = self.conv_up1.forward_act(&h, Activation::PRelu(&self.alpha_up1))?.pixel_shuffle2()?;
        lap("up1");
        let h = self.conv_up2.forward_act(&h, Activation::PRelu(&self.alpha_up2))?;
        lap("conv_up2");
        let y = self.conv_last.forward_shuffled(&h)?;
        lap("shuffle_conv_last");
        // The network ends in tanh on [−1, 1]; the trained model maps that to 0..255.
        let out = ((y.tanh()? + 1.0)? * 0.5)?;
        lap("tanh");
        Ok(out)
    }
}

impl Module for SrResNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        SrResNet::forward(self, x)
    }
}
