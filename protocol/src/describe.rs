//! What a plugin says about itself (`describe()` in the C ABI), as the daemon forwards it in
//! `welcome` and `listing`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The layer contract's roles (DESIGN.md §3). An engine returns any subset.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum LayerRole {
    Base,
    PixelDetail,
    SemanticDetail,
    /// A whole image rendered exactly at chosen parameters (the `render` request's result):
    /// PiSA-SR's x(λ_pix, λ_sem), where layer opacities only approximate λ.
    Exact,
}

impl LayerRole {
    pub const ALL: [LayerRole; 3] = [LayerRole::Base, LayerRole::PixelDetail, LayerRole::SemanticDetail];

    pub fn is_residual(self) -> bool {
        matches!(self, LayerRole::PixelDetail | LayerRole::SemanticDetail)
    }
    pub fn label(self) -> &'static str {
        match self {
            LayerRole::Base => "base",
            LayerRole::PixelDetail => "pixel detail",
            LayerRole::SemanticDetail => "semantic detail",
            LayerRole::Exact => "exact render",
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PluginInfo {
    pub id: String,
    pub version: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub models: Vec<ModelInfo>,
    /// The device kinds this build of the plugin runs on (`cpu`, `cuda`): a GPU build is the
    /// same crate with a feature on, and says so here.
    #[serde(default = "cpu_only")]
    pub devices: Vec<String>,
}

fn cpu_only() -> Vec<String> {
    vec!["cpu".into()]
}

impl PluginInfo {
    /// Whether this build runs on `device` (`cpu`, `cuda:N`).
    pub fn runs_on(&self, device: &str) -> bool {
        let kind = device.split(':').next().unwrap_or(device);
        self.devices.iter().any(|d| d == kind)
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub scales: Vec<u32>,
    /// The layers a job returns, in stacking order from the bottom.
    pub layers: Vec<LayerRole>,
    #[serde(default)]
    pub parameters: Vec<ParamInfo>,
    /// Whether the engine can re-render exactly at chosen (λ_pix, λ_sem) without a model pass.
    #[serde(default)]
    pub exact_render: bool,
    /// Other layer sets for some parameter values (pisa's one-pass mode returns base and one
    /// detail layer); the first whose parameter has its value wins, else `layers`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers_when: Vec<LayersWhen>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LayersWhen {
    pub param: String,
    pub value: Value,
    pub layers: Vec<LayerRole>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    #[serde(flatten)]
    pub kind: ParamKind,
    #[serde(default)]
    pub description: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ParamKind {
    Float { default: f64, min: f64, max: f64 },
    Int { default: i64, min: i64, max: i64 },
    Bool { default: bool },
    Choice { default: String, choices: Vec<String> },
}

impl ParamKind {
    fn default_value(&self) -> Value {
        match self {
            ParamKind::Float { default, .. } => Value::from(*default),
            ParamKind::Int { default, .. } => Value::from(*default),
            ParamKind::Bool { default } => Value::from(*default),
            ParamKind::Choice { default, .. } => Value::from(default.clone()),
        }
    }

    fn check(&self, name: &str, v: &Value) -> Result<(), String> {
        let ok = match self {
            ParamKind::Float { min, max, .. } => v.as_f64().is_some_and(|x| x >= *min && x <= *max),
            ParamKind::Int { min, max, .. } => v.as_i64().is_some_and(|x| x >= *min && x <= *max),
            ParamKind::Bool { .. } => v.is_boolean(),
            ParamKind::Choice { choices, .. } => v.as_str().is_some_and(|s| choices.iter().any(|c| c == s)),
        };
        if ok {
            return Ok(());
        }
        Err(match self {
            ParamKind::Float { min, max, .. } => format!("`{name}` must be a number in [{min}, {max}], not {v}"),
            ParamKind::Int { min, max, .. } => format!("`{name}` must be an integer in [{min}, {max}], not {v}"),
            ParamKind::Bool { .. } => format!("`{name}` must be true or false, not {v}"),
            ParamKind::Choice { choices, .. } => format!("`{name}` must be one of {choices:?}, not {v}"),
        })
    }
}

impl ModelInfo {
    /// The layers a job with these (resolved) parameters returns.
    pub fn layers_for(&self, params: &Map<String, Value>) -> &[LayerRole] {
        self.layers_when.iter().find(|w| params.get(&w.param) == Some(&w.value)).map_or(&self.layers, |w| &w.layers)
    }

    /// Checks `params` against the declared parameters and fills in defaults. Unknown names
    /// are refused so that a typo never silently runs with the default.
    pub fn resolve_params(&self, params: &Map<String, Value>) -> Result<Map<String, Value>, String> {
        for name in params.keys() {
            if !self.parameters.iter().any(|p| &p.name == name) {
                let known: Vec<&str> = self.parameters.iter().map(|p| p.name.as_str()).collect();
                return Err(format!("model `{}` has no parameter `{name}` (it has {known:?})", self.id));
            }
        }
        let mut out = Map::new();
        for p in &self.parameters {
            let v = match params.get(&p.name) {
                Some(v) => {
                    p.kind.check(&p.name, v)?;
                    v.clone()
                }
                None => p.kind.default_value(),
            };
            out.insert(p.name.clone(), v);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model() -> ModelInfo {
        serde_json::from_value(json!({
            "id": "m", "name": "M", "scales": [2], "layers": ["base"],
            "parameters": [
                {"name": "filter", "kind": "choice", "default": "lanczos3", "choices": ["lanczos3", "bicubic"]},
                {"name": "strength", "kind": "float", "default": 1.0, "min": 0.0, "max": 2.0}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn layers_follow_a_parameter() {
        let mut m = model();
        m.layers = vec![LayerRole::Base, LayerRole::PixelDetail, LayerRole::SemanticDetail];
        m.layers_when = vec![LayersWhen { param: "filter".into(), value: json!("bicubic"), layers: vec![LayerRole::Base] }];
        let p = m.resolve_params(&Map::new()).unwrap();
        assert_eq!(m.layers_for(&p).len(), 3);
        let p = m.resolve_params(json!({"filter": "bicubic"}).as_object().unwrap()).unwrap();
        assert_eq!(m.layers_for(&p), [LayerRole::Base]);
    }

    #[test]
    fn params_get_defaults_and_checks() {
        let m = model();
        let p = m.resolve_params(&Map::new()).unwrap();
        assert_eq!(p["filter"], "lanczos3");
        let bad = json!({"filter": "nearest"});
        assert!(m.resolve_params(bad.as_object().unwrap()).unwrap_err().contains("one of"));
        let bad = json!({"strength": 3});
        assert!(m.resolve_params(bad.as_object().unwrap()).is_err());
        let typo = json!({"filtr": "bicubic"});
        assert!(m.resolve_params(typo.as_object().unwrap()).unwrap_err().contains("no parameter"));
    }
}
