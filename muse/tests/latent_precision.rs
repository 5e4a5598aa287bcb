//! Latent-step precision on SmolLM2-135M Q4_1 against a float32 transformers reference and
//! llama.cpp (`tests/fixtures/make_latent_precision.py` made the fixture).
//!
//! Two claims, kept apart because they fail for different reasons:
//! * the concept loop itself (the mix, the position a vector takes, the path it goes through)
//!   is exact: on dequantized weights our logits follow the float32 reference step for step;
//! * on the quantized weights our forward of a vector is as precise as llama.cpp's, which
//!   rounds activations to Q8 the same way. Both implementations are fed the *reference's*
//!   vectors: a loop fed its own vectors amplifies the step-1 rounding through the vector
//!   chaotically (llama.cpp alone moves 3-7x between its own attention precisions on these
//!   prompts), so its step-2 distance is no measure of the implementation.
//!
//! Metric: the centred RMS of `logits − reference` over the reference's top-20 ids (logits
//! are shift-invariant; the top decides the next concept).

use lm::candle::{Device, Tensor};
use lm::Input;
use lm::{LoadOptions, LoadedModel};
use muse::dream::DreamParams;
use muse::session::{DreamSession, Prime};
use serde_json::Value;

fn fixture() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/latent_precision_smollm2.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The prompt's ids, checked against our chat rendering of the same user message.
fn prompt(lm: &LoadedModel, p: &Value) -> Vec<u32> {
    let want = ids(&p["prompt_ids"]);
    let user = p["user"].as_str().unwrap();
    assert_eq!(
        lm.chat_prompt(&[lm::ChatMessage::user(user)]).unwrap(),
        want,
        "chat rendering of {user:?}"
    );
    want
}

/// Centred RMS of `ours[ids] − reference` (the fixture's top-20 ids and logits).
fn top_crms(ours: &[f32], step: &Value) -> f64 {
    let d: Vec<f64> = ids(&step["ids"])
        .iter()
        .zip(floats(&step["reference"]))
        .map(|(&i, r)| ours[i as usize] as f64 - r as f64)
        .collect();
    let mean = d.iter().sum::<f64>() / d.len() as f64;
    (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / d.len() as f64).sqrt()
}

#[test]
fn concept_loop_follows_the_float32_reference_on_dequantized_weights() {
    let fx = fixture();
    let opts = LoadOptions {
        dequantize: true,
        ..Default::default()
    };
    let lm = LoadedModel::load("smollm2-135m", &opts).unwrap();
    let params = DreamParams {
        temperature: fx["temperature"].as_f64().unwrap() as f32,
        top_k: fx["top_k"].as_u64().unwrap() as usize,
        steps: 1,
        ..Default::default()
    };
    for p in fx["prompts"].as_array().unwrap() {
        let mut s = DreamSession::new(&lm);
        s.prime(&Prime::Tokens(prompt(&lm, p))).unwrap();
        // Our own loop through the real burst, one latent step at a time.
        for (n, step) in p["steps"].as_array().unwrap().iter().enumerate() {
            if n > 0 {
                s.burst(&params, |_| true).unwrap();
            }
            let ours = s.logits().unwrap();
            let worst = ids(&step["ids"])
                .iter()
                .zip(floats(&step["reference"]))
                .map(|(&i, r)| (ours[i as usize] - r).abs())
                .fold(0f32, f32::max);
            // Measured: 1e-4; llama.cpp's rounding costs ~0.1-0.2 here.
            assert!(
                worst < 5e-3,
                "{:?} step {}: max |Δlogit| {worst} on dequantized weights",
                p["user"].as_str().unwrap(),
                n + 1
            );
        }
    }
}

#[test]
fn forward_of_a_concept_vector_is_as_precise_as_llama_cpp() {
    let fx = fixture();
    let lm = LoadedModel::load("smollm2-135m", &LoadOptions::default()).unwrap();
    let mut report = Vec::new();
    for p in fx["prompts"].as_array().unwrap() {
        let mut cache = lm.model.new_cache();
        let h = lm
            .model
            .forward(Input::Tokens(&prompt(&lm, p)), &mut cache)
            .unwrap();
        let mut logits = vec![lm.model.last_logits(&h).unwrap()];
        for v in p["vectors"].as_array().unwrap() {
            let v = floats(v);
            let e = Tensor::from_vec(v.clone(), (1, v.len()), &Device::Cpu).unwrap();
            let h = lm.model.forward(Input::Vectors(&e), &mut cache).unwrap();
            logits.push(lm.model.last_logits(&h).unwrap());
        }
        for (ours, step) in logits.iter().zip(p["steps"].as_array().unwrap()) {
            let d_ours = top_crms(ours, step);
            let d_llama = step["llama_cpp_fed_top20_crms"].as_f64().unwrap();
            report.push(format!(
                "{:<48} step {}: ours {d_ours:.3}, llama.cpp {d_llama:.3}",
                p["user"].as_str().unwrap(),
                step["step"]
            ));
            // Two implementations of the same Q8 rounding differ by chance per prompt: over
            // 124 prompts, ours/llama.cpp has median 0.96-1.03 and p95 1.5-1.75 at steps 1-3,
            // the same spread as llama.cpp against itself with F32 instead of F16 attention.
            assert!(
                d_ours <= 2.0 * d_llama + 0.05,
                "{:?} step {}: our top-20 distance {d_ours:.3} exceeds llama.cpp's {d_llama:.3}\n{}",
                p["user"].as_str().unwrap(),
                step["step"],
                report.join("\n")
            );
        }
    }
    eprintln!("{}", report.join("\n"));
}
