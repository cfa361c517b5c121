//! SRResNet / SRGAN generator (Ledig et al. 2017, as trained by krasserm/super-resolution):
//! conv 9×9 → PReLU, 16 residual blocks (conv → BN → PReLU → conv → BN, + input), conv → BN
//! (+ the first features), two ×2 pixel-shuffle upsamplers with PReLU, conv 9×9 → tanh.
//! BatchNorm (Keras ε = 1e-3, inference statistics) is folded into the convolution before
//! it at load, so a forward pass is convolutions and activations only.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor, D};

/// Keras's BatchNormalization default.
pub const BN_EPS: f64 = 1e-3;

struct Conv {
    weight: Tensor,
    /// (1, O, 1, 1), ready to broadcast.
    bias: Tensor,
    padding: usize,
}

impl Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.padding, 1, 1, 1)?.broadcast_add(&self.bias)
    }
}

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
    conv1: Conv,
    prelu: PRelu,
    conv2: Conv,
}

pub struct SrResNet {
    conv_first: Conv,
    prelu_first: PRelu,
    body: Vec<Block>,
    conv_body: Conv,
    conv_up1: Conv,
    prelu_up1: PRelu,
    conv_up2: Conv,
    prelu_up2: PRelu,
    conv_last: Conv,
}

/// Tensors by PyTorch-style key, as the model store holds them.
pub struct Weights(pub HashMap<String, Tensor>);

impl Weights {
    fn get(&self, key: &str) -> Result<&Tensor> {
        self.0.get(key).ok_or_else(|| candle_core::Error::Msg(format!("weight `{key}` is missing")))
    }

    fn conv(&self, name: &str, bn: Option<&str>) -> Result<Conv> {
        let mut weight = self.get(&format!("{name}.weight"))?.to_dtype(DType::F32)?;
        let mut bias = self.get(&format!("{name}.bias"))?.to_dtype(DType::F32)?;
        if let Some(bn) = bn {
            let gamma = self.get(&format!("{bn}.weight"))?;
            let beta = self.get(&format!("{bn}.bias"))?;
            let mean = self.get(&format!("{bn}.running_mean"))?;
            let var = self.get(&format!("{bn}.running_var"))?;
            // y = γ (conv(x) − μ) / √(σ² + ε) + β  =  conv'(x) with w' = w·s, b' = (b − μ)·s + β.
            let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
            weight = weight.broadcast_mul(&scale.reshape((scale.dim(0)?, 1, 1, 1))?)?;
            bias = ((bias - mean)? * &scale)?.add(beta)?;
        }
        let k = weight.dim(D::Minus1)?;
        let o = bias.dim(0)?;
        Ok(Conv { weight, bias: bias.reshape((1, o, 1, 1))?, padding: k / 2 })
    }

    fn prelu(&self, name: &str) -> Result<PRelu> {
        let a = self.get(&format!("{name}.weight"))?.to_dtype(DType::F32)?;
        let c = a.elem_count();
        Ok(PRelu { alpha: a.reshape((1, c, 1, 1))? })
    }
}

impl SrResNet {
    pub fn load(weights: &Weights) -> Result<SrResNet> {
        let body = (0..16)
            .map(|i| {
                Ok(Block {
                    conv1: weights.conv(&format!("body.{i}.conv1"), Some(&format!("body.{i}.bn1")))?,
                    prelu: weights.prelu(&format!("body.{i}.prelu"))?,
                    conv2: weights.conv(&format!("body.{i}.conv2"), Some(&format!("body.{i}.bn2")))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SrResNet {
            conv_first: weights.conv("conv_first", None)?,
            prelu_first: weights.prelu("prelu_first")?,
            body,
            conv_body: weights.conv("conv_body", Some("bn_body"))?,
            conv_up1: weights.conv("conv_up1", None)?,
            prelu_up1: weights.prelu("prelu_up1")?,
            conv_up2: weights.conv("conv_up2", None)?,
            prelu_up2: weights.prelu("prelu_up2")?,
            conv_last: weights.conv("conv_last", None)?,
        })
    }

    pub fn load_file(path: &std::path::Path, device: &Device) -> Result<SrResNet> {
        SrResNet::load(&Weights(candle_core::safetensors::load(path, device)?))
    }

    /// (N, 3, h, w) RGB in [0, 1] → (N, 3, 4h, 4w) in [0, 1].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x1 = self.prelu_first.forward(&self.conv_first.forward(x)?)?;
        let mut h = x1.clone();
        for b in &self.body {
            let t = b.prelu.forward(&b.conv1.forward(&h)?)?;
            h = (h + b.conv2.forward(&t)?)?;
        }
        let h = (self.conv_body.forward(&h)? + x1)?;
        let h = self.prelu_up1.forward(&candle_nn::ops::pixel_shuffle(&self.conv_up1.forward(&h)?, 2)?)?;
        let h = self.prelu_up2.forward(&candle_nn::ops::pixel_shuffle(&self.conv_up2.forward(&h)?, 2)?)?;
        // The network ends in tanh on [−1, 1]; the trained model maps that to 0..255.
        (self.conv_last.forward(&h)?.tanh()? + 1.0)? * 0.5
    }
}

impl Module for SrResNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        SrResNet::forward(self, x)
    }
}
