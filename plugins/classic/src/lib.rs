//! The classic engine: Lanczos-3 (default) or bicubic upscaling in f32 on any buffer layout.
//! It invents no detail, so it returns the `base` layer alone; every neural engine's `base`
//! is this engine's bicubic image.

use serde_json::{json, Value};
use tessera_plugin_abi::{export_plugin, Engine, EngineError, Job};
use tessera_protocol::{LayerRole, PluginInfo};
use tessera_resample::{upscale, Filter};

pub const MODEL_ID: &str = "classic";

pub struct Classic;

impl Engine for Classic {
    fn describe() -> PluginInfo {
        serde_json::from_value(json!({
            "id": "classic",
            "version": env!("CARGO_PKG_VERSION"),
            "name": "Classic resampling",
            "description": "Lanczos-3 and bicubic upscaling in f32. Invents no detail: returns the base layer alone.",
            "models": [{
                "id": MODEL_ID,
                "name": "Lanczos-3 / bicubic",
                "description": "Separable resampling with Pillow's conventions; alpha is resampled apart (premultiplied colour). ×1 is an exact copy, for round-trip checks.",
                "scales": [1, 2, 3, 4],
                "layers": ["base"],
                "parameters": [{
                    "name": "filter", "kind": "choice", "default": "lanczos3",
                    "choices": ["lanczos3", "bicubic"],
                    "description": "Resampling filter: Lanczos-3 (sharper) or Keys bicubic a = −0.5 (the neural engines' base)."
                }],
                "exact_render": false
            }]
        }))
        .expect("static description is valid")
    }

    fn create(_config: &Value) -> Result<Self, String> {
        Ok(Classic)
    }

    fn process(&mut self, job: &mut Job<'_>) -> Result<(), EngineError> {
        let filter_name = job.param_str("filter").unwrap_or("lanczos3");
        let filter = Filter::parse(filter_name)
            .ok_or_else(|| EngineError::Failed(format!("unknown filter `{filter_name}`")))?;
        let Job { input, outputs, calls, .. } = job;
        let Some((_, out)) = outputs.iter_mut().find(|(r, _)| *r == LayerRole::Base) else {
            return Err(EngineError::Failed("the host allocated no base layer".into()));
        };
        upscale(input, out, filter, calls)
    }
}

export_plugin!(Classic);

