//! The CUDA path against references: our kernels against CPU math, the fused decoder (graphs,
//! batches with ragged lengths, prompts) against candle's plain ops on the same weights.
//! Built only with `--features cuda`; needs a GPU (run on the GPU machine, see BENCHMARKS.md).
#![cfg(feature = "cuda")]

use lm::candle::{DType, Device, Tensor};
use lm::model::{shape_named, Input, LoadOptions, Model};
use lm::KvCache;

fn gpu() -> Device {
    lm::device::open("cuda:0").expect("a CUDA device")
}

/// A deterministic pseudo-random vector with ties (every value appears several times).
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let x = i
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(97))
                % 20_011;
            (x as f32 - 10_000.0) / 997.0
        })
        .collect()
}

#[test]
fn topk_matches_a_cpu_sort_including_ties() {
    let dev = gpu();
    let (rows, n) = (3, 151_936);
    let host: Vec<Vec<f32>> = (0..rows).map(|r| values(n, r as u32)).collect();
    let x = Tensor::from_vec(host.concat(), (rows, n), &dev).unwrap();
    for k in [1, 50, 1024] {
        let (vals, idx) = lm::cuda::topk(&x, k).unwrap();
        let vals: Vec<Vec<f32>> = vals.to_vec2().unwrap();
        let idx: Vec<Vec<u32>> = idx.to_vec2().unwrap();
        for r in 0..rows {
            let mut order: Vec<u32> = (0..n as u32).collect();
            order.sort_by(|&a, &b| {
                host[r][b as usize]
                    .total_cmp(&host[r][a as usize])
                    .then(a.cmp(&b))
            });
            assert_eq!(idx[r], order[..k].to_vec(), "row {r}, k {k}");
            let want: Vec<f32> = order[..k].iter().map(|&i| host[r][i as usize]).collect();
            assert_eq!(vals[r], want);
        }
    }
    assert!(lm::cuda::topk(&x, 0).is_err());
    assert!(lm::cuda::topk(&x, 1025).is_err());
}

#[test]
fn softmax_stats_match_cpu_math() {
    let dev = gpu();
    let n = 151_936;
    let a = values(n, 1);
    let b = values(n, 2);
    let t = 0.8f32;
    let la = Tensor::from_vec(a.clone(), (1, n), &dev).unwrap();
    let lb = Tensor::from_vec(b.clone(), (1, n), &dev).unwrap();
    let (_, logp_a) = lm::cuda::softmax_stats(&la, 1.0 / t, None, true).unwrap();
    let (stats, _) = lm::cuda::softmax_stats(&lb, 1.0 / t, logp_a.as_ref(), false).unwrap();
    let got: Vec<f32> = stats.flatten_all().unwrap().to_vec1().unwrap();
    let logp = |v: &[f32]| -> Vec<f64> {
        let z: Vec<f64> = v.iter().map(|&x| x as f64 / t as f64).collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        z.iter().map(|x| x - lse).collect()
    };
    let (pa, pb) = (logp(&a), logp(&b));
    let entropy: f64 = -pb.iter().map(|l| l.exp() * l).sum::<f64>();
    let kl: f64 = pb.iter().zip(&pa).map(|(l, q)| l.exp() * (l - q)).sum();
    assert!(
        (got[1] as f64 - entropy).abs() < 1e-3 * entropy.max(1.0),
        "{got:?} vs H {entropy}"
    );
    assert!(
        (got[2] as f64 - kl).abs() < 1e-3 * kl.max(1.0),
        "{got:?} vs KL {kl}"
    );
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
        ids.push(lm::sampling::argmax(&lf));
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
            next.push(lm::sampling::argmax(&plain.last_logits(&hp).unwrap()));
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
