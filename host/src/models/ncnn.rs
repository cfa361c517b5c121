//! ncnn models (`.param` graph + `.bin` blobs) → BasicSR-keyed RRDBNet tensors.
//!
//! Real-ESRGAN's registry packages ship the network as ncnn files made by onnx2ncnn and
//! ncnnoptimize (fp16 weights). The graph is read to find the convolutions in module order and
//! to check, before any name is trusted, that it is the RRDBNet topology: 3×3 convolutions with
//! bias, dense blocks of five (inputs 64, 96, …, 192; LeakyReLU 0.2 on the first four), two
//! nearest ×2 upsamplers. research/bundled-weights.md §1 has the format.

use super::convert::{ConvertError, Data, Tensor};

/// ncnn's magic number on the first line of every `.param` file.
const MAGIC: &str = "7767517";
/// `.bin` weight tags (ncnn `ModelBinFromDataReader::load`, type 0).
const TAG_F16: u32 = 0x0130_6B47;
const TAG_F32: u32 = 0;

fn bad(msg: impl Into<String>) -> ConvertError {
    ConvertError::Ncnn(msg.into())
}

/// One layer line: `Type Name n_in n_out in… out… k=v…` (array parameters are skipped).
#[derive(Debug)]
struct Layer {
    kind: String,
    name: String,
    params: Vec<(i32, String)>,
}

impl Layer {
    fn int(&self, key: i32, default: i64) -> Result<i64, ConvertError> {
        match self.params.iter().find(|(k, _)| *k == key) {
            Some((_, v)) => v.parse().map_err(|_| bad(format!("layer {}: parameter {key}={v} is not an integer", self.name))),
            None => Ok(default),
        }
    }

    fn float_array(&self, key: i32) -> Vec<f32> {
        // Arrays are written under key -23300 - key: `-233xx=n,v1,…,vn`.
        let array_key = -23300 - key;
        self.params
            .iter()
            .find(|(k, _)| *k == array_key)
            .map(|(_, v)| v.split(',').skip(1).filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_default()
    }
}

/// Parses a `.param` file. Lines may end in CRLF and fields be separated by runs of spaces.
fn parse_param(text: &str) -> Result<Vec<Layer>, ConvertError> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    if lines.next() != Some(MAGIC) {
        return Err(bad(format!("not an ncnn .param file (the first line is not {MAGIC})")));
    }
    let counts: Vec<usize> = lines
        .next()
        .ok_or_else(|| bad("the .param file ends after its magic number"))?
        .split_whitespace()
        .map(|v| v.parse().map_err(|_| bad("bad layer/blob counts")))
        .collect::<Result<_, _>>()?;
    let layers: Vec<Layer> = lines
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let count = |i: usize| f.get(i).and_then(|v| v.parse::<usize>().ok()).ok_or_else(|| bad(format!("bad layer line `{line}`")));
            let (n_in, n_out) = (count(2)?, count(3)?);
            let first_param = 4 + n_in + n_out;
            let params = f
                .get(first_param..)
                .ok_or_else(|| bad(format!("layer line `{line}` lists fewer blobs than it declares")))?
                .iter()
                .map(|kv| {
                    let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("bad parameter `{kv}`")))?;
                    Ok((k.parse().map_err(|_| bad(format!("bad parameter key `{kv}`")))?, v.to_string()))
                })
                .collect::<Result<_, ConvertError>>()?;
            Ok(Layer { kind: f[0].to_string(), name: f[1].to_string(), params })
        })
        .collect::<Result<_, ConvertError>>()?;
    if counts.first() != Some(&layers.len()) {
        return Err(bad(format!("the .param file declares {:?} layers but lists {}", counts.first(), layers.len())));
    }
    Ok(layers)
}

/// A convolution as the graph declares it, with its blobs read from the `.bin`.
struct Conv {
    out_c: usize,
    in_c: usize,
    leaky: Option<f32>,
    weight: Data,
    bias: Vec<f32>,
}

/// Reads `n` tagged weight values at `*at`, moving `*at` past them (and their padding).
fn read_weight(bin: &[u8], at: &mut usize, n: usize, layer: &str) -> Result<Data, ConvertError> {
    let take = |at: &mut usize, len: usize| -> Result<&[u8], ConvertError> {
        let s = bin.get(*at..*at + len).ok_or_else(|| bad(format!("the .bin file ends inside layer {layer}")))?;
        *at += len;
        Ok(s)
    };
    let tag = u32::from_le_bytes(take(at, 4)?.try_into().expect("4 bytes"));
    match tag {
        TAG_F16 => {
            let raw = take(at, 2 * n)?;
            let data = raw.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
            *at = at.next_multiple_of(4);
            Ok(Data::F16(data))
        }
        TAG_F32 => Ok(Data::F32(take(at, 4 * n)?.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4"))).collect())),
        other => Err(bad(format!("layer {layer}: weight storage tag {other:#010x} is not supported (only fp16 and fp32)"))),
    }
}

fn read_convs(layers: &[Layer], bin: &[u8]) -> Result<Vec<Conv>, ConvertError> {
    let mut at = 0usize;
    let mut convs = Vec::new();
    let mut interps = 0;
    for l in layers {
        match l.kind.as_str() {
            "Input" | "Split" | "Concat" | "Eltwise" | "BinaryOp" => {}
            "Interp" => {
                // Nearest (0=1), ×2 both ways.
                if l.int(0, 0)? != 1 || l.params.iter().any(|(k, v)| (*k == 1 || *k == 2) && v.parse::<f32>().ok() != Some(2.0)) {
                    return Err(bad(format!("layer {}: only nearest ×2 Interp layers are expected", l.name)));
                }
                interps += 1;
            }
            "Convolution" => {
                let out_c = l.int(0, 0)? as usize;
                let (k, dil, stride, pad, bias) = (l.int(1, 0)?, l.int(2, 1)?, l.int(3, 1)?, l.int(4, 0)?, l.int(5, 0)?);
                if (k, dil, stride, pad, bias) != (3, 1, 1, 1, 1) || l.int(8, 0)? != 0 {
                    return Err(bad(format!("layer {}: expected a 3×3, stride 1, pad 1 convolution with bias", l.name)));
                }
                let n = l.int(6, 0)? as usize;
                if out_c == 0 || !n.is_multiple_of(out_c * 9) {
                    return Err(bad(format!("layer {}: {n} weights do not make {out_c} 3×3 filters", l.name)));
                }
                let leaky = match l.int(9, 0)? {
                    0 => None,
                    2 => Some(l.float_array(10).first().copied().unwrap_or(0.0)),
                    a => return Err(bad(format!("layer {}: fused activation {a} is not LeakyReLU", l.name))),
                };
                let weight = read_weight(bin, &mut at, n, &l.name)?;
                let raw = bin.get(at..at + 4 * out_c).ok_or_else(|| bad(format!("the .bin file ends inside layer {}", l.name)))?;
                at += 4 * out_c;
                let bias = raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4"))).collect();
                convs.push(Conv { out_c, in_c: n / (out_c * 9), leaky, weight, bias });
            }
            other => return Err(bad(format!("layer {} has type {other}, which RRDBNet does not use", l.name))),
        }
    }
    if at != bin.len() {
        return Err(bad(format!("the .bin file has {} bytes after the last weight", bin.len() - at)));
    }
    if interps != 2 {
        return Err(bad(format!("expected two upsampling layers (×4), found {interps}")));
    }
    Ok(convs)
}

/// The architecture read from a converted file.
#[derive(Debug, PartialEq)]
pub struct Rrdb {
    pub num_block: usize,
}

/// BasicSR RRDBNet ×4's convolutions in module order: name, (out, in) channels, and whether
/// LeakyReLU 0.2 follows. All are 3×3 with bias.
pub fn rrdbnet_convs(num_block: usize, feat: usize, grow: usize) -> Vec<(String, (usize, usize, bool))> {
    let mut names = vec![("conv_first".to_string(), (feat, 3, false))];
    for b in 0..num_block {
        for r in 1..=3 {
            for c in 1..=5 {
                let shape = if c < 5 { (grow, feat + grow * (c - 1), true) } else { (feat, feat + 4 * grow, false) };
                names.push((format!("body.{b}.rdb{r}.conv{c}"), shape));
            }
        }
    }
    names.push(("conv_body".into(), (feat, feat, false)));
    for n in ["conv_up1", "conv_up2", "conv_hr"] {
        names.push((n.into(), (feat, feat, true)));
    }
    names.push(("conv_last".into(), (3, feat, false)));
    names
}

/// Converts an RRDBNet ×4 ncnn model into tensors named like BasicSR's `RRDBNet` state dict
/// (`conv_first`, `body.{b}.rdb{r}.conv{c}`, `conv_body`, `conv_up1`, `conv_up2`, `conv_hr`,
/// `conv_last`), weights fp16 as published and biases fp32.
pub fn rrdbnet(param: &[u8], bin: &[u8]) -> Result<(Vec<Tensor>, Rrdb), ConvertError> {
    let text = std::str::from_utf8(param).map_err(|_| bad("the .param file is not text"))?;
    let convs = read_convs(&parse_param(text)?, bin)?;
    if convs.len() < 6 || (convs.len() - 6) % 15 != 0 {
        return Err(bad(format!("{} convolutions is not an RRDBNet (6 + 15 per block)", convs.len())));
    }
    let num_block = (convs.len() - 6) / 15;
    let (feat, grow) = (convs[0].out_c, convs.get(1).map_or(0, |c| c.out_c));
    let names = rrdbnet_convs(num_block, feat, grow);
    let mut tensors = Vec::with_capacity(2 * convs.len());
    for ((name, (out_c, in_c, leaky)), conv) in names.into_iter().zip(convs) {
        let slope_ok = match conv.leaky {
            None => !leaky,
            Some(s) => leaky && (s - 0.2).abs() < 1e-6,
        };
        if (conv.out_c, conv.in_c) != (out_c, in_c) || !slope_ok {
            return Err(bad(format!(
                "{name}: the graph has a {}→{} convolution (activation {:?}), RRDBNet needs {in_c}→{out_c}{}",
                conv.in_c,
                conv.out_c,
                conv.leaky,
                if leaky { " with LeakyReLU 0.2" } else { "" }
            )));
        }
        tensors.push(Tensor { key: format!("{name}.weight"), shape: vec![out_c, in_c, 3, 3], data: conv.weight });
        tensors.push(Tensor { key: format!("{name}.bias"), shape: vec![out_c], data: Data::F32(conv.bias) });
    }
    Ok((tensors, Rrdb { num_block }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1-block RRDBNet in ncnn form, every weight `1.0` in fp16 and every bias its index.
    fn tiny_model(crlf: bool) -> (String, Vec<u8>) {
        let mut lines = vec![String::from("Input data 0 1 data")];
        let mut bin = Vec::new();
        let mut conv = |lines: &mut Vec<String>, out_c: usize, in_c: usize, leaky: bool| {
            let act = if leaky { " 9=2 -23310=1,2.000000e-01" } else { "" };
            let n = lines.len();
            lines.push(format!("Convolution  conv{n}   1 1 a b 0={out_c} 1=3 4=1 5=1 6={}{act}", out_c * in_c * 9));
            bin.extend(TAG_F16.to_le_bytes());
            for _ in 0..out_c * in_c * 9 {
                bin.extend(0x3C00u16.to_le_bytes());
            }
            bin.resize(bin.len().next_multiple_of(4), 0);
            for i in 0..out_c {
                bin.extend((i as f32).to_le_bytes());
            }
        };
        conv(&mut lines, 64, 3, false);
        for _ in 0..3 {
            for c in 1..=4 {
                conv(&mut lines, 32, 64 + 32 * (c - 1), true);
            }
            conv(&mut lines, 64, 192, false);
        }
        conv(&mut lines, 64, 64, false);
        lines.push("Interp up1 1 1 a b 0=1 1=2.000000e+00 2=2.000000e+00".into());
        conv(&mut lines, 64, 64, true);
        lines.push("Interp up2 1 1 a b 0=1 1=2.000000e+00 2=2.000000e+00".into());
        conv(&mut lines, 64, 64, true);
        conv(&mut lines, 64, 64, true);
        conv(&mut lines, 3, 64, false);
        let eol = if crlf { "\r\n" } else { "\n" };
        let text = format!("{MAGIC}{eol}{} 99{eol}{}{eol}", lines.len(), lines.join(eol));
        (text, bin)
    }

    #[test]
    fn converts_a_one_block_model_by_name() {
        for crlf in [false, true] {
            let (param, bin) = tiny_model(crlf);
            let (tensors, arch) = rrdbnet(param.as_bytes(), &bin).unwrap();
            assert_eq!(arch, Rrdb { num_block: 1 });
            assert_eq!(tensors.len(), 2 * 21);
            let w = tensors.iter().find(|t| t.key == "body.0.rdb2.conv3.weight").unwrap();
            assert_eq!(w.shape, [32, 128, 3, 3]);
            assert!(matches!(&w.data, Data::F16(v) if v.iter().all(|&h| h == 0x3C00)));
            let b = tensors.iter().find(|t| t.key == "conv_last.bias").unwrap();
            assert!(matches!(&b.data, Data::F32(v) if v == &[0.0, 1.0, 2.0]));
        }
    }

    #[test]
    fn refuses_what_is_not_rrdbnet() {
        let (param, bin) = tiny_model(false);
        // A truncated .bin, trailing bytes, a missing activation, a foreign layer type.
        assert!(rrdbnet(param.as_bytes(), &bin[..bin.len() - 4]).is_err());
        assert!(rrdbnet(param.as_bytes(), &[&bin[..], &[0u8; 4]].concat()).is_err());
        let no_act = param.replacen(" 9=2 -23310=1,2.000000e-01", "", 1);
        let err = rrdbnet(no_act.as_bytes(), &bin).err().unwrap().to_string();
        assert!(err.contains("body.0.rdb1.conv1"), "{err}");
        let foreign = param.replacen("Interp up1", "Pooling up1", 1);
        assert!(rrdbnet(foreign.as_bytes(), &bin).err().unwrap().to_string().contains("Pooling"));
        assert!(rrdbnet(b"not ncnn", &bin).is_err());
    }
}
