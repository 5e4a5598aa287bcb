//! The prefix cache on the real SmolLM2: a prime that starts from a cached prefix continues
//! exactly like a cold prime of the whole prompt, a retry of the same prompt evaluates only
//! its last token, a session gives its prompt's KV back when it ends, and entries leave least
//! recently used first within the byte budget.

use lm::PrefixCache;
use lm::{ChatMessage, GenerateOptions, LoadOptions, LoadedModel, SamplingParams};
use muse::session::{CommitParams, DreamSession, Prime};
use std::sync::OnceLock;

fn smollm() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| LoadedModel::load("smollm2-135m", &LoadOptions::default()).unwrap())
}

const BUDGET: usize = 256 << 20;

fn first_turn() -> Vec<ChatMessage> {
    vec![ChatMessage::user("Write one line about the moon.")]
}

fn second_turn() -> Vec<ChatMessage> {
    let mut m = first_turn();
    m.push(ChatMessage::new(
        "assistant",
        "The moon hangs low, a lantern over the sleeping sea.",
    ));
    m.push(ChatMessage::user("Now one about the sun."));
    m
}

fn greedy(max_tokens: usize) -> CommitParams {
    CommitParams {
        decode: GenerateOptions {
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop_on_eos: false,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_prime_from_a_cached_prefix_continues_like_a_cold_prime() {
    let lm = smollm();
    let (first, second) = (first_turn(), second_turn());
    let first_ids = lm.chat_prompt(&first).unwrap();
    let second_ids = lm.chat_prompt(&second).unwrap();
    assert!(
        second_ids.starts_with(&first_ids),
        "the next turn extends the prompt"
    );

    let mut cold = DreamSession::new(lm);
    cold.prime(&Prime::Chat(second.clone())).unwrap();
    let want = cold.logits().unwrap();
    let want_text = cold.commit(&greedy(12), |_| {}).unwrap().text;

    let prefixes = PrefixCache::new(BUDGET);
    let p = DreamSession::new(lm)
        .prime_with(&Prime::Chat(first), Some(&prefixes))
        .unwrap();
    assert_eq!((p.prompt_tokens, p.cached_tokens), (first_ids.len(), 0));

    let mut next = DreamSession::new(lm);
    let p = next
        .prime_with(&Prime::Chat(second.clone()), Some(&prefixes))
        .unwrap();
    assert_eq!(
        (p.prompt_tokens, p.cached_tokens),
        (second_ids.len(), first_ids.len())
    );
    assert_eq!(next.len(), second_ids.len());
    // Bit for bit: a sampled reply, not only a greedy one, replays from its seed.
    let d = max_abs_diff(&next.logits().unwrap(), &want);
    assert_eq!(d, 0.0, "next-token logits differ from a cold prime by {d}");
    // Past the frontier too: the decoded text reads the whole cache.
    assert_eq!(next.commit(&greedy(12), |_| {}).unwrap().text, want_text);
    // The second turn took the first turn's entry, which it extends, and gives its own back
    // when it ends.
    assert_eq!(prefixes.len(), 0);
    drop(next);
    assert_eq!(prefixes.len(), 1);

    // A retry primes the same prompt again: all but its last token come from the cache, whose
    // positions past the prompt (the commit above) were forgotten.
    let mut retry = DreamSession::new(lm);
    let p = retry
        .prime_with(&Prime::Chat(second), Some(&prefixes))
        .unwrap();
    assert_eq!(p.cached_tokens, second_ids.len() - 1);
    let d = max_abs_diff(&retry.logits().unwrap(), &want);
    assert_eq!(d, 0.0, "a retry's logits differ from a cold prime by {d}");
    assert_eq!(retry.commit(&greedy(12), |_| {}).unwrap().text, want_text);
    drop(retry);
    assert_eq!(prefixes.len(), 1);

    // Another conversation sharing only the start copies it and leaves the entry in place.
    let mut other = first_turn();
    other.push(ChatMessage::new("assistant", "Silver light."));
    let p = DreamSession::new(lm)
        .prime_with(&Prime::Chat(other), Some(&prefixes))
        .unwrap();
    assert!(p.cached_tokens >= first_ids.len(), "{p:?}");
    assert_eq!(prefixes.len(), 2);
}

/// Three prompts of 40 tokens that share no prefix.
fn prompt(k: u32) -> Prime {
    Prime::Tokens((0..40).map(|i| 1000 + 100 * k + i).collect())
}

fn cached(prefixes: &PrefixCache, k: u32) -> usize {
    DreamSession::new(smollm())
        .prime_with(&prompt(k), Some(prefixes))
        .unwrap()
        .cached_tokens
}

#[test]
fn entries_leave_least_recently_used_first_within_the_budget() {
    let probe = PrefixCache::new(BUDGET);
    cached(&probe, 0);
    let entry = probe.bytes();
    assert!(entry > 0);

    // Room for two entries.
    let prefixes = PrefixCache::new(2 * entry + entry / 2);
    assert_eq!((cached(&prefixes, 0), cached(&prefixes, 1)), (0, 0));
    assert_eq!(cached(&prefixes, 0), 39, "0 is held, and now used last");
    assert_eq!(cached(&prefixes, 2), 0);
    assert_eq!((prefixes.len(), prefixes.bytes()), (2, 2 * entry));
    assert_eq!(cached(&prefixes, 0), 39, "0 stayed");
    assert_eq!(
        cached(&prefixes, 1),
        0,
        "1 was used least recently: it left"
    );

    // An entry larger than the whole budget is not kept; a budget of 0 keeps nothing.
    for budget in [entry - 1, 0] {
        let small = PrefixCache::new(budget);
        assert_eq!((cached(&small, 0), cached(&small, 0)), (0, 0));
        assert!(small.is_empty());
    }
}
