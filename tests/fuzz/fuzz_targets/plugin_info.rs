//! A plugin's describe() JSON (the daemon reads it from every plugin it loads), then job
//! parameters resolved against each model it describes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_protocol::PluginInfo;

fuzz_target!(|data: &[u8]| {
    // The first half describes the plugin, the rest is a submit's params.
    let (info, params) = data.split_at(data.len() / 2);
    let Ok(info) = serde_json::from_slice::<PluginInfo>(info) else { return };
    let params = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(params).unwrap_or_default();
    for m in &info.models {
        if let Ok(p) = m.resolve_params(&params) {
            let _ = m.layers_for(&p);
        }
    }
});
