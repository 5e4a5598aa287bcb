//! The fused decoder on CUDA (graphs, batches with ragged lengths, prompts) against candle's
//! plain ops on the same weights. Built only with `--features cuda`; needs a GPU (run on the
//! GPU machine, see BENCHMARKS.md). The kernels' own tests are unit tests in `lm::cuda`.
#![cfg(feature = "cuda")]

use lm::candle::{DType, Device, Tensor};
use lm::{shape_named, Input, KvCache, LoadOptions, Model};

fn gpu() -> Device {
    lm::open_device("cuda:0").expect("a CUDA device")
}

fn load(fused: bool) -> Model {
    let opts = LoadOptions {
        device: gpu(),
        max_context: Some(512),
        fused,
        ..Default::default()
    };
    Model::random(shape_named("qwen2.5-0.5b").unwrap(), 7, &opts).unwrap()
}

/// Largest absolute difference relative to the largest magnitude.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let scale = b.iter().map(|x| x.abs()).fold(0f32, f32::max).max(1e-6);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

#[test]
fn fused_path_matches_plain_ops_for_prompts_steps_batches_and_rewinds() {
    let fused = load(true);
    let plain = load(false);
    assert!(fused.is_fused() && !plain.is_fused());
    let vocab = fused.config().vocab as u32;
    let prompts: Vec<Vec<u32>> = [5usize, 17, 40]
        .iter()
        .map(|&n| {
            (0..n as u32)
                .map(|i| (i * 7919 + n as u32) % vocab)
                .collect()
        })
        .collect();
    let mut fc: Vec<KvCache> = prompts.iter().map(|_| fused.new_cache()).collect();
    let mut pc: Vec<KvCache> = prompts.iter().map(|_| plain.new_cache()).collect();
    let mut ids = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let hf = fused.forward(Input::Tokens(p), &mut fc[i]).unwrap();
        let hp = plain.forward(Input::Tokens(p), &mut pc[i]).unwrap();
        let d = rel_diff(&hf, &hp);
        assert!(d < 0.05, "prompt {i}: hidden differs by {d}");
        let lf = fused.last_logits(&hf).unwrap();
        ids.push(lm::argmax(&lf));
    }
    // Batched steps (a replayed graph) against one-at-a-time plain steps, ragged lengths.
    for step in 0..6 {
        let x = fused.embed(&ids).unwrap();
        let mut refs: Vec<&mut KvCache> = fc.iter_mut().collect();
        let hb = fused.forward_batch(&x, &mut refs).unwrap();
        let mut next = Vec::new();
        for (i, c) in pc.iter_mut().enumerate() {
            let hp = plain.forward(Input::Tokens(&[ids[i]]), c).unwrap();
            let d = rel_diff(&hb.narrow(0, i, 1).unwrap(), &hp);
            assert!(d < 0.05, "step {step}, row {i}: hidden differs by {d}");
            next.push(lm::argmax(&plain.last_logits(&hp).unwrap()));
        }
        ids = next;
    }
    for (f, p) in fc.iter().zip(&pc) {
        assert_eq!(f.len(), p.len());
    }
    // Rewind, then the same step again gives the same state (graph for batch 1 this time).
    let pos = fc[0].len();
    let x = fused.embed(&[ids[0]]).unwrap();
    let a = fused.forward(Input::Vectors(&x), &mut fc[0]).unwrap();
    fc[0].truncate(pos);
    let b = fused.forward(Input::Vectors(&x), &mut fc[0]).unwrap();
    assert_eq!(rel_diff(&a, &b), 0.0);
    // A cache cannot fill past its capacity.
    let mut c = fused.new_cache();
    let long: Vec<u32> = vec![1; fused.max_context() + 1];
    assert!(fused.forward(Input::Tokens(&long), &mut c).is_err());
}
