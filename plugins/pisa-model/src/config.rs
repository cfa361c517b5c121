//! The diffusers and transformers `config.json` files the networks are built from. Any
//! channel counts work (SD2.1-base and the small parity models run the same code); features
//! SD2.1 does not use are refused by name rather than silently ignored.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// A number given once for every block, or once per block.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn get(&self, block: usize) -> usize {
        match self {
            PerBlock::One(n) => *n,
            PerBlock::Each(v) => v.get(block).copied().unwrap_or_else(|| *v.last().unwrap_or(&1)),
        }
    }
}

fn one() -> PerBlock {
    PerBlock::One(1)
}
fn four() -> usize {
    4
}
fn three() -> usize {
    3
}
fn two() -> usize {
    2
}
fn groups() -> usize {
    32
}
fn eps_unet() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn unit() -> f64 {
    1.0
}
fn silu() -> String {
    "silu".into()
}
fn positional() -> String {
    "positional".into()
}
fn default_shift() -> String {
    "default".into()
}
fn mid_cross() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

/// `unet/config.json` of a `UNet2DConditionModel`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    /// diffusers reads this as the number of heads when `num_attention_heads` is absent (SD2.1's
    /// `[5, 10, 20, 20]`: heads of 64 channels).
    #[serde(default)]
    pub attention_head_dim: Option<PerBlock>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "one")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default = "eps_unet")]
    pub norm_eps: f64,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "one_usize")]
    pub downsample_padding: usize,
    #[serde(default = "unit")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default = "mid_cross")]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
}

fn one_usize() -> usize {
    1
}

impl UNetConfig {
    /// The number of attention heads of down block `i` (up blocks use the reversed list).
    pub fn heads(&self, block: usize) -> usize {
        self.num_attention_heads.as_ref().or(self.attention_head_dim.as_ref()).map_or(8, |h| h.get(block))
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |why: String| ModelError::Config { path: path.to_path_buf(), why };
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(bad(format!("{} down blocks, {} up blocks and {} block_out_channels must be as many", self.down_block_types.len(), self.up_block_types.len(), n)));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(bad(format!("down block type `{t}` is not one of SD2.1's (CrossAttnDownBlock2D, DownBlock2D)")));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(bad(format!("up block type `{t}` is not one of SD2.1's (CrossAttnUpBlock2D, UpBlock2D)")));
            }
        }
        let refuse = |what: &str, set: bool| if set { Err(bad(format!("`{what}` is set: Tessera runs SD2.1-style UNets without it"))) } else { Ok(()) };
        refuse("class_embed_type", self.class_embed_type.is_some())?;
        refuse("addition_embed_type", self.addition_embed_type.is_some())?;
        refuse("encoder_hid_dim", self.encoder_hid_dim.is_some())?;
        refuse("time_cond_proj_dim", self.time_cond_proj_dim.is_some())?;
        refuse("dual_cross_attention", self.dual_cross_attention)?;
        refuse("center_input_sample", self.center_input_sample)?;
        refuse("only_cross_attention", self.only_cross_attention.as_bool().unwrap_or(false) || self.only_cross_attention.is_array())?;
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return Err(bad(format!("mid block type {:?} is not UNetMidBlock2DCrossAttn", self.mid_block_type)));
        }
        if self.act_fn != "silu" || self.time_embedding_type != "positional" || self.resnet_time_scale_shift != "default" {
            return Err(bad("act_fn, time_embedding_type and resnet_time_scale_shift must be SD2.1's (silu, positional, default)".into()));
        }
        if self.norm_num_groups == 0 {
            return Err(bad("norm_num_groups is 0: GroupNorm needs at least one group".into()));
        }
        for (i, c) in self.block_out_channels.iter().enumerate() {
            let heads = self.heads(i);
            if c % self.norm_num_groups != 0 || heads == 0 || c % heads != 0 {
                return Err(bad(format!("block {i}: {c} channels do not divide into {} groups and {heads} heads", self.norm_num_groups)));
            }
        }
        Ok(())
    }
}

fn one_layer() -> usize {
    1
}
fn sd_scaling() -> f64 {
    0.18215
}

/// `vae/config.json` of an `AutoencoderKL`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one_layer")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "sd_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
}

impl VaeConfig {
    pub const NORM_EPS: f64 = 1e-6;

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |why: String| ModelError::Config { path: path.to_path_buf(), why };
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.iter().any(|t| t != "DownEncoderBlock2D") || self.up_block_types.iter().any(|t| t != "UpDecoderBlock2D") || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(bad("an AutoencoderKL of SD's kind has as many DownEncoderBlock2D and UpDecoderBlock2D as block_out_channels".into()));
        }
        if self.act_fn != "silu" || self.shift_factor.is_some_and(|s| s != 0.0) {
            return Err(bad("act_fn must be silu and shift_factor unset (SD2.1's VAE)".into()));
        }
        if self.norm_num_groups == 0 {
            return Err(bad("norm_num_groups is 0: GroupNorm needs at least one group".into()));
        }
        if let Some(c) = self.block_out_channels.iter().find(|c| *c % self.norm_num_groups != 0) {
            return Err(bad(format!("{c} channels do not divide into {} groups", self.norm_num_groups)));
        }
        Ok(())
    }
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn clip_eps() -> f64 {
    1e-5
}
fn positions() -> usize {
    77
}

/// `text_encoder/config.json` of a `CLIPTextModel`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "clip_eps")]
    pub layer_norm_eps: f64,
}

impl ClipConfig {
    fn validate(&self, path: &Path) -> Result<()> {
        if !matches!(self.hidden_act.as_str(), "gelu" | "quick_gelu") {
            return Err(ModelError::Config { path: path.to_path_buf(), why: format!("hidden_act `{}` is neither gelu nor quick_gelu", self.hidden_act) });
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ModelError::Config { path: path.to_path_buf(), why: "hidden_size must divide into num_attention_heads".into() });
        }
        Ok(())
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::File { path: path.to_path_buf(), why: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config { path: path.to_path_buf(), why: e.to_string() })
}

pub fn read_unet(path: &Path) -> Result<UNetConfig> {
    let c: UNetConfig = read_json(path)?;
    c.validate(path)?;
    Ok(c)
}

pub fn read_vae(path: &Path) -> Result<VaeConfig> {
    let c: VaeConfig = read_json(path)?;
    c.validate(path)?;
    Ok(c)
}

pub fn read_clip(path: &Path) -> Result<ClipConfig> {
    let c: ClipConfig = read_json(path)?;
    c.validate(path)?;
    Ok(c)
}

/// Parses a config already read (as the model store keeps them), validated like a file.
pub fn parse_unet(text: &str, name: &Path) -> Result<UNetConfig> {
    let c: UNetConfig = serde_json::from_str(text).map_err(|e| ModelError::Config { path: name.to_path_buf(), why: e.to_string() })?;
    c.validate(name)?;
    Ok(c)
}

pub fn parse_vae(text: &str, name: &Path) -> Result<VaeConfig> {
    let c: VaeConfig = serde_json::from_str(text).map_err(|e| ModelError::Config { path: name.to_path_buf(), why: e.to_string() })?;
    c.validate(name)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the diffusers_config fuzz target: zero groups divided by zero.
    #[test]
    fn zero_norm_groups_is_an_error_not_a_panic() {
        let vae = include_str!("../../../tests/fixtures/pisa/sd21-tiny/vae/config.json").replace("\"norm_num_groups\": 8", "\"norm_num_groups\": 0");
        let unet = include_str!("../../../tests/fixtures/pisa/sd21-tiny/unet/config.json").replace("\"norm_num_groups\": 8", "\"norm_num_groups\": 0");
        for err in [parse_vae(&vae, Path::new("vae/config.json")).err(), parse_unet(&unet, Path::new("unet/config.json")).err()] {
            assert!(err.expect("refused").to_string().contains("norm_num_groups is 0"));
        }
    }
}
