//! `Model::forward_batch` (one position for each of several sequences) and random-weight
//! models, on the CPU: the contract the fused CUDA path implements (see tests/cuda.rs).

use lm::candle::Tensor;
use lm::{shape_named, Input, LoadOptions, Model};
use lm::{KvCache, LoadedModel};

fn tiny() -> Model {
    Model::random(shape_named("tiny").unwrap(), 0, &LoadOptions::default()).unwrap()
}

#[test]
fn a_batch_step_equals_one_step_per_sequence_and_advances_each_cache() {
    let m = tiny();
    let prompts: [&[u32]; 3] = [&[1, 2, 3], &[4], &[5, 6, 7, 8, 9, 10]];
    let mut batch: Vec<KvCache> = prompts.iter().map(|_| m.new_cache()).collect();
    for (c, p) in batch.iter_mut().zip(prompts) {
        m.forward(Input::Tokens(p), c).unwrap();
    }
    let mut single = batch.clone();
    let ids = [11u32, 12, 13];
    let x = m.embed(&ids).unwrap();
    let mut refs: Vec<&mut KvCache> = batch.iter_mut().collect();
    let h = m.forward_batch(&x, &mut refs).unwrap();
    assert_eq!(h.dims(), &[3, m.config().hidden]);
    for (i, c) in single.iter_mut().enumerate() {
        let want = m.forward(Input::Tokens(&ids[i..=i]), c).unwrap();
        let got = h.narrow(0, i, 1).unwrap();
        let d: f32 = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-5, "row {i} differs by {d}");
    }
    let lens: Vec<usize> = batch.iter().map(KvCache::len).collect();
    assert_eq!(lens, vec![4, 2, 7]);
}

#[test]
fn a_bad_batch_is_refused_and_no_cache_moves() {
    let m = tiny();
    let mut caches: Vec<KvCache> = (0..2).map(|_| m.new_cache()).collect();
    for c in caches.iter_mut() {
        m.forward(Input::Tokens(&[1, 2]), c).unwrap();
    }
    let three = m.embed(&[1, 2, 3]).unwrap();
    let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
    let e = m.forward_batch(&three, &mut refs).unwrap_err().to_string();
    assert!(e.contains("3 input rows for 2 caches"), "{e}");
    let wrong_width = Tensor::zeros((2, 7), lm::candle::DType::F32, m.device()).unwrap();
    assert!(m.forward_batch(&wrong_width, &mut refs).is_err());
    assert!(caches.iter().all(|c| c.len() == 2));
}

#[test]
fn random_models_dream_with_a_synthetic_tokenizer() {
    let lm = LoadedModel::synthetic(tiny(), "tiny").unwrap();
    assert_eq!(lm.tokenizer.decode(&[7, 8], false).unwrap(), "<t7> <t8>");
    assert_eq!(lm.raw_prompt("<t7> <t8>").unwrap(), vec![7, 8]);
    let e = shape_named("qwen9").unwrap_err().to_string();
    assert!(e.contains("qwen2.5-1.5b"), "{e}");
}

/// A step is one position: more is refused, saying what to use instead; a step on a full
/// cache fails with the context overflow and leaves the cache as it was.
#[test]
fn a_step_of_several_positions_or_past_the_context_is_refused() {
    let m = Model::random(
        shape_named("tiny").unwrap(),
        0,
        &LoadOptions {
            max_context: Some(4),
            ..Default::default()
        },
    )
    .unwrap();
    let mut c = m.new_cache();
    let e = m
        .step(Input::Tokens(&[1, 2]), &mut c)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a step feeds one position, got 2; use forward"),
        "{e}"
    );
    assert_eq!(c.len(), 0);
    m.forward(Input::Tokens(&[1, 2, 3, 4]), &mut c).unwrap();
    let e = m.step(Input::Tokens(&[5]), &mut c).unwrap_err().to_string();
    assert!(e.contains("context overflow"), "{e}");
    assert_eq!(c.len(), 4);
    let out = m.step(Input::Tokens(&[5]), &mut m.new_cache()).unwrap();
    assert_eq!(out.logits.dims(), &[1, m.config().vocab]);
}
