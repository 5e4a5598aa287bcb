//! The dream loop on the real SmolLM2: its first step is the next-token distribution, a
//! one-hot concept is greedy decoding, seeds replay bit for bit, and stops, guards, commits and
//! rewinds do what they say.

use lm::GenerateOptions;
use lm::Input;
use lm::{ChatMessage, LoadOptions, LoadedModel, SamplingParams};
use muse::dream::{ColdStop, DreamParams, LatentMode, TelemetryLevel};
use muse::render::Render;
use muse::session::{CommitParams, DreamSession, Prime, PRIMED};
use muse::telemetry::{BurstStop, LatentStep};
use std::sync::OnceLock;

fn smollm() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| LoadedModel::load("smollm2-135m", &LoadOptions::default()).unwrap())
}

fn france() -> Prime {
    Prime::Chat(vec![ChatMessage::user("The capital of France is")])
}

fn dream(params: &DreamParams) -> (Vec<LatentStep>, DreamSession<'static>) {
    let mut s = DreamSession::new(smollm());
    s.prime(&france()).unwrap();
    let mut steps = Vec::new();
    s.burst(params, |st| {
        steps.push(st.clone());
        true
    })
    .unwrap();
    (steps, s)
}

#[test]
fn first_latent_step_is_the_next_token_distribution() {
    let params = DreamParams {
        temperature: 1.0,
        top_k: 20,
        steps: 1,
        top_n: 20,
        ..Default::default()
    };
    let (steps, _) = dream(&params);
    let lm = smollm();
    let ids = lm
        .chat_prompt(&[ChatMessage::user("The capital of France is")])
        .unwrap();
    let mut cache = lm.model.new_cache();
    let logits = lm
        .model
        .last_logits(&lm.model.forward(Input::Tokens(&ids), &mut cache).unwrap())
        .unwrap();
    let want = lm::distribution(
        &logits,
        &SamplingParams {
            temperature: 1.0,
            top_k: 20,
            top_p: 1.0,
            ..Default::default()
        },
        &[],
    );
    let got_ids: Vec<u32> = steps[0].top.iter().map(|t| t.id).collect();
    assert_eq!(got_ids, want.ids);
    for (t, p) in steps[0].top.iter().zip(&want.probs) {
        assert!((t.p - p).abs() < 1e-6, "{} vs {p}", t.p);
    }
    // Same quantity, summed differently (log Z − E[z] in f64 against −Σ p ln p in f32).
    let d = (steps[0].entropy_full - want.full_entropy).abs();
    assert!(
        d < 1e-4 * want.full_entropy.max(1.0),
        "entropy {} vs {}",
        steps[0].entropy_full,
        want.full_entropy
    );
}

#[test]
fn one_hot_concepts_are_greedy_decoding() {
    let params = DreamParams {
        top_k: 1,
        steps: 4,
        ..Default::default()
    };
    let (steps, session) = dream(&params);
    let dreamt: Vec<u32> = steps.iter().map(|s| s.top[0].id).collect();
    let lm = smollm();
    let ids = lm
        .chat_prompt(&[ChatMessage::user("The capital of France is")])
        .unwrap();
    let opts = GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_tokens: 5,
        stop_on_eos: false,
        ..Default::default()
    };
    let greedy = lm::generate(lm, &ids, &opts, |_| {}).unwrap();
    assert_eq!(dreamt, greedy.tokens[..4].to_vec());
    // The fifth distribution after four one-hot steps is greedy's fifth choice.
    assert_eq!(lm::argmax(&session.logits().unwrap()), greedy.tokens[4]);
    assert!(steps.iter().all(|s| s.entropy == 0.0 && s.top[0].p == 1.0));
}

fn noisy(seed: u64) -> DreamParams {
    DreamParams {
        gumbel_tau: Some(0.7),
        dirichlet_alpha: Some(20.0),
        noise: 0.2,
        seed,
        steps: 6,
        ..Default::default()
    }
}

/// A commit that keeps the dream as unspoken thought (`replace`: swapped for the text after).
fn think(decode: GenerateOptions, replace: bool) -> CommitParams {
    CommitParams {
        decode,
        render: Render::Think { replace },
    }
}

fn dream_and_commit(params: &DreamParams) -> (Vec<LatentStep>, String) {
    let (steps, mut s) = dream(params);
    let opts = GenerateOptions {
        sampling: SamplingParams {
            seed: params.seed,
            ..Default::default()
        },
        max_tokens: 12,
        ..Default::default()
    };
    let c = s.commit(&think(opts, false), |_| {}).unwrap();
    (steps, c.text)
}

#[test]
fn same_seed_same_dream_other_seed_other_dream() {
    let strip = |v: Vec<LatentStep>| {
        v.into_iter()
            .map(|s| (s.top, s.norm.to_bits(), s.entropy.to_bits()))
            .collect::<Vec<_>>()
    };
    let (a, ta) = dream_and_commit(&noisy(7));
    let (b, tb) = dream_and_commit(&noisy(7));
    assert_eq!(strip(a.clone()), strip(b), "same seed, different dream");
    assert_eq!(ta, tb);
    let (c, _) = dream_and_commit(&noisy(8));
    assert_ne!(strip(a), strip(c), "different seeds gave the same dream");
}

#[test]
fn hidden_mode_is_rescaled_to_the_embedding_scale() {
    let lm = smollm();
    let emb = lm.model.embedding();
    let typical = emb.mean_row_rms() * (emb.hidden() as f32).sqrt();
    for mode in [LatentMode::Hidden, LatentMode::Blend] {
        let (steps, _) = dream(&DreamParams {
            mode,
            steps: 3,
            ..Default::default()
        });
        assert_eq!(steps.len(), 3);
        if mode == LatentMode::Hidden {
            for s in &steps {
                assert!(
                    (s.norm - typical).abs() / typical < 1e-3,
                    "{mode:?}: ‖e‖ {} vs {typical}",
                    s.norm
                );
            }
        }
        assert!(steps.iter().all(|s| s.norm.is_finite() && s.norm > 0.0));
    }
}

#[test]
fn cold_stop_and_norm_guard_end_the_burst_with_a_reason() {
    let mut s = DreamSession::new(smollm());
    let primed = s.prime(&france()).unwrap();
    let cold = DreamParams {
        steps: 10,
        cold_stop: Some(ColdStop {
            threshold: 100.0,
            patience: 2,
        }),
        ..Default::default()
    };
    let b = s.burst(&cold, |_| true).unwrap();
    assert_eq!((b.stop, b.steps), (BurstStop::ColdStop, 2));
    s.rewind(PRIMED).unwrap();
    let guard = DreamParams {
        max_norm_ratio: 1e-3,
        ..Default::default()
    };
    let b = s.burst(&guard, |_| true).unwrap();
    assert_eq!((b.stop, b.steps), (BurstStop::NormBlowup, 0));
    assert_eq!(s.len(), primed, "a guarded step must not be fed");
    let cancel = s
        .burst(
            &DreamParams {
                steps: 5,
                ..Default::default()
            },
            |st| st.step < 1,
        )
        .unwrap();
    assert_eq!((cancel.stop, cancel.steps), (BurstStop::Cancelled, 2));
}

#[test]
fn think_commits_and_rewind_manage_the_context() {
    let mut s = DreamSession::new(smollm());
    let primed = s.prime(&france()).unwrap();
    let primed_logits = s.logits().unwrap();
    let opts = GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_tokens: 6,
        stop_on_eos: false,
        ..Default::default()
    };
    s.burst(
        &DreamParams {
            steps: 4,
            ..Default::default()
        },
        |_| true,
    )
    .unwrap();
    let keep = s.commit(&think(opts.clone(), false), |_| {}).unwrap();
    assert_eq!(s.len(), primed + 4 + keep.tokens.len());
    s.rewind(PRIMED).unwrap();
    assert_eq!(s.len(), primed);
    assert_eq!(s.logits().unwrap(), primed_logits);
    s.burst(
        &DreamParams {
            steps: 4,
            ..Default::default()
        },
        |_| true,
    )
    .unwrap();
    let mut streamed = String::new();
    let rep = s
        .commit(&think(opts, true), |t| streamed.push_str(t))
        .unwrap();
    assert_eq!(
        s.len(),
        primed + rep.tokens.len(),
        "replace must swap the latents for the text"
    );
    assert_eq!(streamed, rep.text);
    assert_eq!(rep.tokens.len(), 6);
    // The frontier after `replace` is that of the text itself.
    let lm = smollm();
    let mut ids = lm
        .chat_prompt(&[ChatMessage::user("The capital of France is")])
        .unwrap();
    ids.extend(&rep.tokens);
    let mut cache = lm.model.new_cache();
    let want = lm
        .model
        .last_logits(&lm.model.forward(Input::Tokens(&ids), &mut cache).unwrap())
        .unwrap();
    let d = want
        .iter()
        .zip(&s.logits().unwrap())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1.5, "frontier after replace differs by {d}");
    assert_eq!(lm::argmax(&want), lm::argmax(&s.logits().unwrap()));
    let e = s.rewind("nope").unwrap_err().to_string();
    assert!(
        e.contains("unknown checkpoint `nope`") && e.contains(PRIMED),
        "{e}"
    );
    // Errors stay small: a huge name is neither stored nor echoed, and a long list of
    // checkpoints is cut short.
    let huge = "x".repeat(1 << 20);
    assert!(s.checkpoint(&huge).is_err());
    for i in 0..40 {
        s.checkpoint(&format!("cp{i:02}")).unwrap();
    }
    let e = s.rewind(&huge).unwrap_err().to_string();
    assert!(
        e.len() < 1024 && e.contains("known") && e.contains('…'),
        "{e}"
    );
}

#[test]
fn bad_knobs_are_rejected_naming_the_field() {
    let cases = [
        (
            DreamParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            "temperature",
        ),
        (
            DreamParams {
                top_k: 0,
                ..Default::default()
            },
            "top_k",
        ),
        (
            DreamParams {
                steps: muse::dream::MAX_STEPS + 1,
                ..Default::default()
            },
            "steps",
        ),
        (
            DreamParams {
                gumbel_tau: Some(0.0),
                ..Default::default()
            },
            "gumbel_tau",
        ),
        (
            DreamParams {
                noise: -1.0,
                ..Default::default()
            },
            "noise",
        ),
        (
            DreamParams {
                telemetry: TelemetryLevel::Full,
                blend_alpha: 2.0,
                ..Default::default()
            },
            "blend_alpha",
        ),
    ];
    for (p, field) in cases {
        assert_eq!(p.validate().unwrap_err().field, field);
    }
    let fresh = DreamSession::new(smollm())
        .burst(&DreamParams::default(), |_| true)
        .err()
        .unwrap()
        .to_string();
    assert!(fresh.contains("not primed"), "{fresh}");
}
