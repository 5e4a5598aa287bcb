//! Rendering a burst into text on the real SmolLM2: a draft that keeps every top proposal is
//! greedy decoding, exact speculative acceptance samples what plain sampling samples, the
//! reader translates vectors into words, and bursts start between words only.

use lm::{ChatMessage, GenerateOptions, LoadOptions, LoadedModel, SamplingParams};
use muse::dream::DreamParams;
use muse::render::{Framing, Leash, Proposal, Render};
use muse::session::{CommitParams, DreamSession, Prime, PRIMED};
use muse::telemetry::BurstStop;
use std::collections::HashMap;
use std::sync::OnceLock;

fn smollm() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| LoadedModel::load("smollm2-135m", &LoadOptions::default()).unwrap())
}

fn commit(sampling: SamplingParams, max_tokens: usize, render: Render) -> CommitParams {
    CommitParams {
        decode: GenerateOptions {
            sampling,
            max_tokens,
            stop_on_eos: false,
            ..Default::default()
        },
        render,
    }
}

const KEEP_ALL: Leash = Leash::Typical {
    epsilon: 0.0,
    delta: 0.0,
};

#[test]
fn a_draft_that_keeps_every_top_proposal_is_greedy_decoding() {
    let lm = smollm();
    let chat = [ChatMessage::user("Write a haiku about the sea.")];
    let mut s = DreamSession::new(lm);
    s.prime(&Prime::Chat(chat.to_vec())).unwrap();
    // A concept at temperature 0 is the argmax token's embedding: the dream runs greedy.
    let burst = DreamParams {
        temperature: 0.0,
        steps: 5,
        ..Default::default()
    };
    assert_eq!(s.burst(&burst, |_| true).unwrap().steps, 5);
    let render = Render::Draft {
        proposal: Proposal::Top,
        leash: KEEP_ALL,
    };
    let c = s
        .commit(&commit(SamplingParams::greedy(), 12, render), |_| {})
        .unwrap();
    assert_eq!((c.proposed, c.accepted), (5, 5));
    let ids = lm.chat_prompt(&chat).unwrap();
    let greedy = lm::generate(
        lm,
        &ids,
        &GenerateOptions {
            sampling: SamplingParams::greedy(),
            max_tokens: 12,
            stop_on_eos: false,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(c.tokens, greedy.tokens);
    assert_eq!(c.text, greedy.text);
    assert!(greedy.text.starts_with(&c.rendered), "{:?}", c.rendered);
    // The context is text again: the latent positions were replaced.
    assert_eq!(s.len(), ids.len() + 12);
}

/// Frequencies of the one token a commit after a one-step burst renders, over `runs` seeds.
fn one_token_frequencies(render: Render, runs: u64) -> HashMap<u32, f64> {
    let lm = smollm();
    let mut s = DreamSession::new(lm);
    s.prime(&Prime::Raw("My favourite colour is".into()))
        .unwrap();
    let mut counts: HashMap<u32, f64> = HashMap::new();
    for seed in 0..runs {
        s.rewind(PRIMED).unwrap();
        let b = s
            .burst(
                &DreamParams {
                    steps: 1,
                    ..Default::default()
                },
                |_| true,
            )
            .unwrap();
        assert_eq!(b.steps, 1, "{:?}", b.stop);
        let sampling = SamplingParams {
            seed,
            ..SamplingParams::default()
        };
        let c = s.commit(&commit(sampling, 1, render), |_| {}).unwrap();
        *counts.entry(c.tokens[0]).or_default() += 1.0 / runs as f64;
    }
    counts
}

/// Total variation distance between observed frequencies and a distribution, over its five
/// most probable tokens and the rest as one bin (bins of a few draws would measure noise).
fn total_variation(freq: &HashMap<u32, f64>, p: &lm::Distribution) -> f64 {
    let top = &p.ids[..5.min(p.ids.len())];
    let f = |id: &u32| freq.get(id).copied().unwrap_or(0.0);
    let rest_freq = 1.0 - top.iter().map(f).sum::<f64>();
    let rest_p = 1.0 - top.iter().map(|&id| p.prob(id) as f64).sum::<f64>();
    (top.iter()
        .map(|id| (f(id) - p.prob(*id) as f64).abs())
        .sum::<f64>()
        + (rest_freq - rest_p).abs())
        / 2.0
}

#[test]
fn exact_acceptance_samples_what_plain_sampling_samples() {
    let lm = smollm();
    let mut s = DreamSession::new(lm);
    s.prime(&Prime::Raw("My favourite colour is".into()))
        .unwrap();
    let plain = lm::distribution(&s.logits().unwrap(), &SamplingParams::default(), &[]);
    assert!(plain.ids.len() > 3 && plain.probs[0] < 0.8, "{plain:?}");
    const RUNS: u64 = 800;
    // The sampling error of 800 draws over these six bins is ~0.03 in total variation.
    for proposal in [Proposal::Top, Proposal::Sample] {
        let freq = one_token_frequencies(
            Render::Draft {
                proposal,
                leash: Leash::Exact,
            },
            RUNS,
        );
        let tv = total_variation(&freq, &plain);
        eprintln!("{proposal:?}, exact leash: total variation {tv:.3} from plain sampling");
        assert!(
            tv < 0.07,
            "{proposal:?}: total variation {tv:.3} from plain sampling"
        );
    }
    // The test can tell: a leash that keeps every top proposal renders the top token only.
    let kept = one_token_frequencies(
        Render::Draft {
            proposal: Proposal::Top,
            leash: KEEP_ALL,
        },
        200,
    );
    let tv = total_variation(&kept, &plain);
    eprintln!("keep-all leash: total variation {tv:.3} from plain sampling");
    assert!(tv > 0.2, "{tv:.3}");
}

#[test]
fn the_reader_translates_concept_vectors_into_words() {
    // Seed 003's setup: "The capital of France is", three concept steps, read back by the
    // model itself in both framings.
    let lm = smollm();
    for framing in [Framing::Completion, Framing::Instruction] {
        let mut s = DreamSession::new(lm);
        s.prime(&Prime::Raw("The capital of France is".into()))
            .unwrap();
        s.burst(
            &DreamParams {
                steps: 3,
                ..Default::default()
            },
            |_| true,
        )
        .unwrap();
        let c = s
            .commit(
                &commit(SamplingParams::greedy(), 16, Render::Translate { framing }),
                |_| {},
            )
            .unwrap();
        assert_eq!(c.proposed, 3);
        assert!(c.accepted > 0, "{framing:?}: nothing read");
        let words = c.rendered.split_whitespace().count();
        assert!(
            (1..=12).contains(&words) && c.rendered.chars().any(|ch| ch.is_alphabetic()),
            "{framing:?}: {:?}",
            c.rendered
        );
        assert!(
            c.text.trim_start().starts_with(c.rendered.trim_start()),
            "{:?}",
            c.text
        );
    }
}

#[test]
fn bursts_start_between_words_only() {
    let lm = smollm();
    let mut s = DreamSession::new(lm);
    s.prime(&Prime::Raw("The capital of Fr".into())).unwrap();
    let at = s.len();
    let b = s.burst(&DreamParams::default(), |_| true).unwrap();
    assert_eq!((b.stop, b.steps, s.len()), (BurstStop::MidWord, 0, at));
    // A commit told to end at a word puts the next burst between words.
    let chat = Prime::Chat(vec![ChatMessage::user("Tell me a story about a dragon.")]);
    for seed in 0..6 {
        s.prime(&chat).unwrap();
        let mut c = commit(
            SamplingParams {
                seed,
                ..Default::default()
            },
            7,
            Render::default(),
        );
        c.decode.end_at_word = true;
        let done = s.commit(&c, |_| {}).unwrap();
        assert!(done.tokens.len() <= 7 + lm::WORD_TAIL);
        let b = s
            .burst(
                &DreamParams {
                    steps: 2,
                    ..Default::default()
                },
                |_| true,
            )
            .unwrap();
        assert_ne!(b.stop, BurstStop::MidWord, "seed {seed}: {:?}", done.text);
    }
}
