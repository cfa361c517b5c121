//! Every golden message parses into our types and serialises back to exactly the same JSON, so
//! the Rust types and `protocol/golden/` (also read by the Python tests) cannot drift apart.

use std::path::Path;

use serde_json::Value;
use tessera_protocol::{parse_request, Event, EVENT_TYPES, REQUEST_TYPES};

fn golden(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_request_type_round_trips() {
    for ty in REQUEST_TYPES {
        let v = golden(ty);
        let req = parse_request(v.to_string().as_bytes()).unwrap_or_else(|e| panic!("{ty}: {e:?}"));
        assert_eq!(serde_json::to_value(&req).unwrap(), v, "{ty}");
    }
}

#[test]
fn every_event_type_round_trips() {
    for ty in EVENT_TYPES {
        let v = golden(ty);
        let ev: Event = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{ty}: {e}"));
        assert_eq!(serde_json::to_value(&ev).unwrap(), v, "{ty}");
    }
}

#[test]
fn there_is_a_golden_file_for_each_type_and_no_other() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().trim_end_matches(".json").to_string())
        .collect();
    files.sort();
    let mut types: Vec<String> = REQUEST_TYPES.iter().chain(EVENT_TYPES).map(|s| s.to_string()).collect();
    types.sort();
    assert_eq!(files, types);
}
