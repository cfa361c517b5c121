//! transformers' `CLIPTextModel` (the text tower SD2.1 conditions on), run once at import to
//! compute the empty prompt's embedding; nothing runs it at upscale time.

use candle_core::{Device, Module, Tensor};

use crate::config::ClipConfig;
use crate::error::Result;
use crate::nn::{self, Ctx, Linear};
use crate::weights::Vb;

struct Layer {
    norm1: candle_nn::LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: candle_nn::LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct ClipText {
    config: ClipConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_norm: candle_nn::LayerNorm,
}

impl ClipText {
    /// `vb` is the root of the checkpoint: its keys start with `text_model.` (as in SD2.1's
    /// release) or directly with `embeddings.` (as transformers 5 saves them).
    pub fn load(vb: &Vb, config: &ClipConfig) -> Result<ClipText> {
        let c = config;
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let prefixed = vb.pp("text_model.embeddings.token_embedding").contains("weight");
        let t = if prefixed { vb.pp("text_model") } else { vb.clone() };
        let emb = t.pp("embeddings");
        let layers = (0..c.num_hidden_layers)
            .map(|i| -> Result<Layer> {
                let l = t.pp(format!("encoder.layers.{i}"));
                let a = l.pp("self_attn");
                Ok(Layer {
                    norm1: nn::layer_norm(&l.pp("layer_norm1"), d, eps)?,
                    q: Linear::load(&a.pp("q_proj"), None, d, d, true)?,
                    k: Linear::load(&a.pp("k_proj"), None, d, d, true)?,
                    v: Linear::load(&a.pp("v_proj"), None, d, d, true)?,
                    out: Linear::load(&a.pp("out_proj"), None, d, d, true)?,
                    norm2: nn::layer_norm(&l.pp("layer_norm2"), d, eps)?,
                    fc1: Linear::load(&l.pp("mlp.fc1"), None, d, c.intermediate_size, true)?,
                    fc2: Linear::load(&l.pp("mlp.fc2"), None, c.intermediate_size, d, true)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(ClipText {
            config: c.clone(),
            token_embedding: emb.pp("token_embedding").get("weight", &[c.vocab_size, d])?,
            position_embedding: emb.pp("position_embedding").get("weight", &[c.max_position_embeddings, d])?,
            layers,
            final_norm: nn::layer_norm(&t.pp("final_layer_norm"), d, eps)?,
        })
    }

    /// `last_hidden_state` `[1, tokens, hidden]` for token ids (causal attention, no padding
    /// mask: what diffusers pipelines pass).
    pub fn forward(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        let n = ids.len();
        let ids_t = Tensor::new(ids, device)?;
        let x = self.token_embedding.index_select(&ids_t, 0)?;
        let pos = self.position_embedding.narrow(0, 0, n)?;
        let mut x = (x + pos)?.unsqueeze(0)?;
        let mask: Vec<f32> = (0..n * n).map(|i| if i % n > i / n { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (n, n), device)?;
        let ctx = Ctx::default();
        for l in &self.layers {
            let h = l.norm1.forward(&x)?;
            let (q, k, v) = (l.q.forward(&h, &ctx)?, l.k.forward(&h, &ctx)?, l.v.forward(&h, &ctx)?);
            let a = nn::attention(&q, &k, &v, self.config.num_attention_heads, Some(&mask), &ctx)?;
            x = (x + l.out.forward(&a, &ctx)?)?;
            let h = l.fc1.forward(&l.norm2.forward(&x)?, &ctx)?;
            let h = if self.config.hidden_act == "quick_gelu" { (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)? } else { h.gelu_erf()? };
            x = (x + l.fc2.forward(&h, &ctx)?)?;
        }
        self.final_norm.forward(&x)
    }
}
