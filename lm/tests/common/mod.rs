//! Shared by the integration tests: the default models, loaded once per test binary.

#![allow(dead_code)]

use lm::{LoadOptions, LoadedModel};
use std::sync::OnceLock;

pub fn smollm() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        LoadedModel::load("smollm2-135m", &LoadOptions::default()).expect("load smollm2-135m")
    })
}

pub fn gemma() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        LoadedModel::load("gemma3-270m", &LoadOptions::default()).expect("load gemma3-270m")
    })
}

/// The same file with f32 weights: no activation quantization, so exact comparisons hold.
pub fn dequantized(alias: &str) -> &'static LoadedModel {
    static S: OnceLock<LoadedModel> = OnceLock::new();
    static G: OnceLock<LoadedModel> = OnceLock::new();
    let cell = if alias == "smollm2-135m" { &S } else { &G };
    cell.get_or_init(|| {
        let opts = LoadOptions {
            dequantize: true,
            ..Default::default()
        };
        LoadedModel::load(alias, &opts).expect("load dequantized")
    })
}

pub fn by_alias(alias: &str) -> &'static LoadedModel {
    match alias {
        "smollm2-135m" => smollm(),
        "gemma3-270m" => gemma(),
        other => panic!("no test model {other}"),
    }
}

pub fn fixture(name: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
