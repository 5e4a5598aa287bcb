//! The dream loop on a CUDA device (fused path, GPU top-k and statistics): every mode runs,
//! top-1 concept steps are greedy decoding, and concurrent sessions (batched steps) all finish.
//! Built only with `--features cuda`; needs a GPU.
#![cfg(feature = "cuda")]

use lm::model::{shape_named, LoadOptions, Model};
use lm::LoadedModel;
use muse::dream::{DreamParams, LatentMode, TelemetryLevel};
use muse::session::{DreamSession, Prime};

fn model() -> LoadedModel {
    let opts = LoadOptions {
        device: lm::open_device("cuda:0").unwrap(),
        max_context: Some(1024),
        ..Default::default()
    };
    let m = Model::random(shape_named("qwen2.5-0.5b").unwrap(), 3, &opts).unwrap();
    assert!(m.is_fused());
    LoadedModel::synthetic(m, "random").unwrap()
}

fn prompt() -> Prime {
    Prime::Tokens((0..12u32).map(|i| i * 977 + 5).collect())
}

#[test]
fn every_mode_runs_and_reports_kl_after_the_first_step() {
    let lm = model();
    for mode in [LatentMode::Concept, LatentMode::Hidden, LatentMode::Blend] {
        let mut s = DreamSession::new(&lm);
        s.prime(&prompt()).unwrap();
        let mut steps = Vec::new();
        let params = DreamParams {
            mode,
            steps: 6,
            noise: 0.1,
            gumbel_tau: Some(1.0),
            telemetry: TelemetryLevel::Basic,
            ..Default::default()
        };
        let b = s
            .burst(&params, |st| {
                steps.push(st.clone());
                true
            })
            .unwrap();
        assert_eq!(b.steps, 6, "{mode:?}");
        assert_eq!(s.len(), 12 + 6);
        assert!(steps[0].kl_prev.is_none() && steps[1..].iter().all(|s| s.kl_prev.is_some()));
        for st in &steps {
            assert!(
                st.entropy_full.is_finite() && st.entropy_full > 0.0,
                "{st:?}"
            );
            assert!(st.norm.is_finite() && st.norm > 0.0);
            let p: f32 = st.top.iter().map(|t| t.p).sum();
            assert!(p > 0.0 && p <= 1.0 + 1e-4);
        }
    }
}

#[test]
fn top1_concept_steps_are_greedy_decoding() {
    let lm = model();
    let mut s = DreamSession::new(&lm);
    s.prime(&prompt()).unwrap();
    let mut dreamed = Vec::new();
    let params = DreamParams {
        steps: 5,
        temperature: 0.0,
        top_k: 1,
        telemetry: TelemetryLevel::Basic,
        ..Default::default()
    };
    s.burst(&params, |st| {
        dreamed.push(st.top[0].id);
        true
    })
    .unwrap();
    let Prime::Tokens(ids) = prompt() else {
        unreachable!()
    };
    let opts = lm::GenerateOptions {
        sampling: lm::SamplingParams::greedy(),
        max_tokens: 5,
        ..Default::default()
    };
    let greedy = lm::generate(&lm, &ids, &opts, |_| {}).unwrap().tokens;
    assert_eq!(dreamed, greedy);
}

#[test]
fn concurrent_sessions_share_batched_steps_and_all_finish() {
    let lm = model();
    let params = DreamParams {
        steps: 16,
        telemetry: TelemetryLevel::Basic,
        ..Default::default()
    };
    let results: Vec<(usize, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let (lm, params) = (&lm, &params);
                scope.spawn(move || {
                    let mut s = DreamSession::new(lm);
                    s.prime(&Prime::Tokens(vec![7 + i as u32; 3 + i])).unwrap();
                    let b = s.burst(params, |_| true).unwrap();
                    (b.steps, s.len())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (steps, len)) in results.into_iter().enumerate() {
        assert_eq!((steps, len), (16, 3 + i + 16), "session {i}");
    }
}
