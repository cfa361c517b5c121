//! A model's tensors by name, handed out by shape: every tensor a model asks for must be there
//! with exactly the shape its config implies, and every tensor in the file must be asked for,
//! so a file of another architecture (or a truncated one) fails with the key that differs.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// How the layers built from a [`Weights`] keep their weight matrices and run their products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 weights and products: the reference's numbers to float rounding.
    #[default]
    F32,
    /// Linear and convolution weights in bf16 (half the memory), products of bf16 factors
    /// summed in f32: on the CPU by AMX or AVX512_BF16 where it has them
    /// (`tessera_kernels::bf16`), on a GPU by the device's bf16 kernels. Norms, attention
    /// scores and everything between the layers stay f32.
    Bf16,
}

impl Precision {
    pub fn parse(name: &str) -> Option<Precision> {
        match name {
            "f32" => Some(Precision::F32),
            "bf16" => Some(Precision::Bf16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

pub struct Weights {
    /// The file the tensors came from, for errors.
    pub file: String,
    tensors: HashMap<String, Tensor>,
    used: Mutex<BTreeSet<String>>,
    precision: Precision,
}

impl Weights {
    pub fn new(file: impl Into<String>, tensors: HashMap<String, Tensor>) -> Weights {
        Weights { file: file.into(), tensors, used: Mutex::new(BTreeSet::new()), precision: Precision::F32 }
    }

    /// The same weights, for layers that keep them in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Weights {
        self.precision = precision;
        self
    }

    /// Reads a safetensors file or a PyTorch pickle (`.bin`, `.pt`, `.pth`, `.ckpt`), every
    /// tensor as f32 on `device`.
    pub fn read(path: &Path, device: &Device) -> Result<Weights> {
        let fail = |why: String| ModelError::File { path: path.to_path_buf(), why };
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        let tensors: HashMap<String, Tensor> = if is_safetensors {
            let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
            candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| fail(format!("not a readable safetensors file ({e})")))?
        } else {
            crate::torch::read(path, None)
                .map_err(|why| fail(format!("not a readable PyTorch checkpoint ({why})")))?
                .into_iter()
                .collect()
        };
        let mut out = HashMap::with_capacity(tensors.len());
        for (k, t) in tensors {
            let t = t.to_dtype(DType::F32).and_then(|t| t.to_device(device)).map_err(|e| fail(format!("tensor `{k}`: {e}")))?;
            out.insert(k, t);
        }
        Ok(Weights::new(path.display().to_string(), out))
    }

    pub fn root(&self) -> Vb<'_> {
        Vb { weights: self, prefix: String::new() }
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }

    /// The keys no layer asked for (after a model was built from these weights).
    pub fn unused(&self, ignore: impl Fn(&str) -> bool) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<String> = self.tensors.keys().filter(|k| !used.contains(*k) && !ignore(k)).cloned().collect();
        out.sort();
        out
    }

    /// Every key a model asked for, in order.
    pub fn used_keys(&self) -> Vec<String> {
        self.used.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// Fails naming the first tensor no layer asked for.
    pub fn check_all_used(&self, ignore: impl Fn(&str) -> bool, what: &str) -> Result<()> {
        match self.unused(ignore).into_iter().next() {
            Some(key) => Err(ModelError::Unexpected { file: self.file.clone(), key, why: format!("no layer of the {what} described by its config.json has this name") }),
            None => Ok(()),
        }
    }

    pub fn rename(&mut self, from: &str, to: String) {
        if let Some(t) = self.tensors.remove(from) {
            self.tensors.insert(to, t);
        }
    }

    pub fn into_tensors(self) -> HashMap<String, Tensor> {
        self.tensors
    }

    pub fn insert(&mut self, key: String, t: Tensor) {
        self.tensors.insert(key, t);
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A position in the weights' name tree (`down_blocks.0.resnets.1`).
#[derive(Clone)]
pub struct Vb<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl<'a> Vb<'a> {
    pub fn pp(&self, name: impl std::fmt::Display) -> Vb<'a> {
        Vb { weights: self.weights, prefix: join(&self.prefix, &name.to_string()) }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The precision layers built here keep their weights in.
    pub fn precision(&self) -> Precision {
        self.weights.precision
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights.tensors.contains_key(&join(&self.prefix, name))
    }

    /// The tensor `name` under this path, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let key = join(&self.prefix, name);
        let w = self.weights;
        let t = w.tensors.get(&key).ok_or_else(|| ModelError::Missing { file: w.file.clone(), key: key.clone(), expected: shape.to_vec() })?;
        if t.dims() != shape {
            return Err(ModelError::Shape { file: w.file.clone(), key, expected: shape.to_vec(), found: t.dims().to_vec() });
        }
        w.used.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
        Ok(t.clone())
    }
}
