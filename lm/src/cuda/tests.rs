//! Our kernels against CPU math (needs a GPU: run on the GPU machine, see BENCHMARKS.md).

use super::{softmax_stats, topk};
use candle_core::{Device, Tensor};

fn gpu() -> Device {
    crate::device::open("cuda:0").expect("a CUDA device")
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
        let (vals, idx) = topk(&x, k).unwrap();
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
    assert!(topk(&x, 0).is_err());
    assert!(topk(&x, 1025).is_err());
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
    let (_, logp_a) = softmax_stats(&la, 1.0 / t, None, true).unwrap();
    let (stats, _) = softmax_stats(&lb, 1.0 / t, logp_a.as_ref(), false).unwrap();
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
