//! The prior experiment reproduced: concept steps on chat-formatted "The capital of France is"
//! against a float32 HF transformers reference on the same GGUF
//! (`tests/fixtures/make_dream_reference.py` made the fixture).

use lm::{LoadOptions, LoadedModel};
use muse::dream::DreamParams;
use muse::session::{DreamSession, Prime};

#[test]
fn latent_steps_one_and_two_match_the_float32_reference() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dream_reference_smollm2.json");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let lm = LoadedModel::load("smollm2-135m", &LoadOptions::default()).unwrap();
    let prompt: Vec<u32> = fx["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    // Our chat rendering gives the reference's ids.
    assert_eq!(
        lm.chat_prompt(&[lm::ChatMessage::user("The capital of France is")])
            .unwrap(),
        prompt
    );
    let mut s = DreamSession::new(&lm);
    s.prime(&Prime::Tokens(prompt)).unwrap();
    let params = DreamParams {
        temperature: 0.8,
        top_k: 50,
        steps: 2,
        top_n: 3,
        ..Default::default()
    };
    let mut steps = Vec::new();
    s.burst(&params, |st| {
        steps.push(st.clone());
        true
    })
    .unwrap();
    for (ours, reference) in steps.iter().zip(fx["steps"].as_array().unwrap()) {
        let want: Vec<u64> = reference["top"]
            .as_array()
            .unwrap()
            .iter()
            .take(3)
            .map(|t| t["id"].as_u64().unwrap())
            .collect();
        let got: Vec<u64> = ours.top.iter().map(|t| t.id as u64).collect();
        assert_eq!(
            got[0],
            want[0],
            "step {}: top-1 differs: ours {:?}, reference {:?}",
            ours.step + 1,
            ours.top,
            reference["top"]
        );
        let shared = got.iter().filter(|id| want.contains(id)).count();
        assert!(
            shared >= 2,
            "step {}: only {shared} of the top-3 shared: ours {:?}",
            ours.step + 1,
            ours.top
        );
        let h = reference["entropy"].as_f64().unwrap() as f32;
        assert!(
            (ours.entropy - h).abs() < 0.5,
            "step {}: entropy {} vs {h}",
            ours.step + 1,
            ours.entropy
        );
    }
}
