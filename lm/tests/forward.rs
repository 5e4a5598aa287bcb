//! The forward's invariants on the real default models: vectors and ids agree, batched and
//! token-by-token prefill agree, and a rewind reproduces the same logits.

mod common;

use common::{by_alias, max_abs_diff};
use lm::Input;

const MODELS: [&str; 2] = ["smollm2-135m", "gemma3-270m"];

fn prompt(alias: &str) -> Vec<u32> {
    let lm = by_alias(alias);
    lm.raw_prompt("The capital of France is Paris, and the capital of Italy is")
        .unwrap()
}

#[test]
fn vectors_from_embed_equal_token_ids() {
    for alias in MODELS {
        let lm = by_alias(alias);
        let ids = prompt(alias);
        let mut c1 = lm.model.new_cache();
        let by_ids = lm
            .model
            .logits(&lm.model.forward(Input::Tokens(&ids), &mut c1).unwrap())
            .unwrap();
        let emb = lm.model.embed(&ids).unwrap();
        assert_eq!(emb.dims(), &[ids.len(), lm.model.config().hidden]);
        let mut c2 = lm.model.new_cache();
        let by_vec = lm
            .model
            .logits(&lm.model.forward(Input::Vectors(&emb), &mut c2).unwrap())
            .unwrap();
        let a: Vec<f32> = by_ids.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = by_vec.flatten_all().unwrap().to_vec1().unwrap();
        let d = max_abs_diff(&a, &b);
        assert!(d < 1e-4, "{alias}: max abs logit diff {d}");
        assert_eq!(by_ids.dims(), &[ids.len(), lm.model.config().vocab]);
    }
}

/// Run on f32 weights: with quantized weights, activations are rounded to 8 bits per block, and
/// float-order noise between a batched and a stepped attention flips roundings that 30 layers
/// amplify (up to ~1 logit), which would hide a real cache bug in the noise.
#[test]
fn batched_prefill_equals_token_by_token() {
    for alias in MODELS {
        let lm = common::dequantized(alias);
        let ids = prompt(alias);
        let mut batched = lm.model.new_cache();
        let h = lm.model.forward(Input::Tokens(&ids), &mut batched).unwrap();
        let all = lm.model.logits(&h).unwrap();
        let mut stepped = lm.model.new_cache();
        for (i, id) in ids.iter().enumerate() {
            let h = lm
                .model
                .forward(Input::Tokens(&[*id]), &mut stepped)
                .unwrap();
            let one: Vec<f32> = lm
                .model
                .logits(&h)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            let row: Vec<f32> = all.get(i).unwrap().to_vec1().unwrap();
            let d = max_abs_diff(&one, &row);
            assert!(d < 1e-3, "{alias}: position {i}: max abs diff {d}");
        }
        assert_eq!(stepped.len(), ids.len());
        assert_eq!(batched.len(), ids.len());
    }
}

#[test]
fn truncate_then_refeed_reproduces_logits() {
    for alias in MODELS {
        let lm = by_alias(alias);
        let ids = prompt(alias);
        let mut cache = lm.model.new_cache();
        let cut = ids.len() - 4;
        lm.model
            .forward(Input::Tokens(&ids[..cut]), &mut cache)
            .unwrap();
        let first = lm
            .model
            .last_logits(
                &lm.model
                    .forward(Input::Tokens(&ids[cut..]), &mut cache)
                    .unwrap(),
            )
            .unwrap();
        // Wander off with other tokens, then rewind and re-feed the same tail.
        lm.model
            .forward(Input::Tokens(&[5, 6, 7, 8, 9]), &mut cache)
            .unwrap();
        cache.truncate(cut);
        assert_eq!(cache.len(), cut);
        let again = lm
            .model
            .last_logits(
                &lm.model
                    .forward(Input::Tokens(&ids[cut..]), &mut cache)
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(first, again, "{alias}: rewind changed the logits");
        assert!(cache.memory_bytes() > 0 && cache.memory_bytes() >= cache.bytes_for(cache.len()));
    }
}

#[test]
fn embedding_rows_and_mean_rms_are_consistent() {
    for alias in MODELS {
        let lm = by_alias(alias);
        let e = lm.model.embedding();
        let rows = e.rows(&[10, 20]).unwrap();
        let mix = e.mix(&[10, 20], &[0.25, 0.75]).unwrap();
        let expect = ((rows.get(0).unwrap() * 0.25).unwrap()
            + (rows.get(1).unwrap() * 0.75).unwrap())
        .unwrap();
        let d = max_abs_diff(
            &mix.squeeze(0).unwrap().to_vec1().unwrap(),
            &expect.to_vec1().unwrap(),
        );
        assert!(d < 1e-5, "{alias}: mix differs by {d}");
        let rms = e.mean_row_rms();
        assert!(rms.is_finite() && rms > 0.0, "{alias}: mean row rms {rms}");
        assert!(
            e.rows(&[e.vocab() as u32]).is_err(),
            "{alias}: out-of-vocabulary id accepted"
        );
    }
}

#[test]
fn gemma_scales_embeddings_into_input_space() {
    let lm = common::gemma();
    let scale = lm
        .model
        .config()
        .embed_scale
        .expect("gemma has an embedding scale");
    assert!((scale - (640f32).sqrt()).abs() < 1e-4);
    // Input-space rows carry the scale: their rms is far above a raw Q8_0 row's (~0.03-0.1).
    assert!(
        lm.model.embedding().mean_row_rms() > 0.3,
        "{}",
        lm.model.embedding().mean_row_rms()
    );
}
