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

/// The ids session `s` feeds at its step `k`: fixed, so a run does not depend on its logits.
fn step_id(s: usize, k: usize) -> u32 {
    (100 + (s * 7919 + k * 104_729) % 5000) as u32
}

/// Session `s`'s steps from its own prompt (ragged lengths across sessions); session 1
/// rewinds five positions halfway and goes on with other ids. Returns the logits' bits per
/// step.
fn run_session(lm: &lm::LoadedModel, s: usize, steps: usize) -> Vec<Vec<u32>> {
    let mut cache = lm.model.new_cache();
    let prompt: Vec<u32> = (0..3 + 4 * s).map(|k| step_id(s + 10, k)).collect();
    lm.model
        .forward(Input::Tokens(&prompt), &mut cache)
        .unwrap();
    (0..steps)
        .map(|k| {
            if s == 1 && k == steps / 2 {
                cache.truncate(cache.len() - 5);
            }
            let id = step_id(s, k) + u32::from(s == 1 && k >= steps / 2);
            let out = lm.model.step(Input::Tokens(&[id]), &mut cache).unwrap();
            let logits: Vec<f32> = out.logits.squeeze(0).unwrap().to_vec1().unwrap();
            logits.iter().map(|x| x.to_bits()).collect()
        })
        .collect()
}

/// Concurrent sessions' prompts and steps run as batched forwards; each session's logits must
/// be the same bits as when it runs alone, whatever it was batched with (ragged positions and
/// row counts, one session rewinding mid-run).
#[test]
fn concurrent_steps_are_batched_and_equal_sequential_steps() {
    const SESSIONS: usize = 4;
    const STEPS: usize = 16;
    for alias in MODELS {
        let lm = by_alias(alias);
        let alone: Vec<_> = (0..SESSIONS).map(|s| run_session(lm, s, STEPS)).collect();
        let before = lm.model.step_stats();
        let start = std::sync::Barrier::new(SESSIONS);
        let together: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..SESSIONS)
                .map(|s| {
                    let start = &start;
                    scope.spawn(move || {
                        start.wait();
                        run_session(lm, s, STEPS)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let after = lm.model.step_stats();
        let (batches, steps) = (after.batches - before.batches, after.steps - before.steps);
        // Each session's prompt is one forward of several rows, then its steps (other tests
        // in this binary may add theirs).
        assert!(steps >= (SESSIONS * (STEPS + 1)) as u64, "{alias}: {steps}");
        assert!(
            batches < steps,
            "{alias}: {steps} concurrent steps ran in {batches} batches: none was batched"
        );
        for s in 0..SESSIONS {
            for k in 0..STEPS {
                assert!(
                    together[s][k] == alone[s][k],
                    "{alias}: session {s} step {k}: batched logits differ from sequential"
                );
            }
        }
    }
}

/// `forward_batch` (one position for each of several caches at ragged lengths) gives each
/// row the same bits as that cache's own forward.
#[test]
fn forward_batch_rows_equal_single_forwards_bit_for_bit() {
    for alias in MODELS {
        let lm = by_alias(alias);
        let mut caches: Vec<_> = (0..3).map(|_| lm.model.new_cache()).collect();
        for (s, c) in caches.iter_mut().enumerate() {
            let prompt: Vec<u32> = (0..2 + 5 * s).map(|k| step_id(s, k)).collect();
            lm.model.forward(Input::Tokens(&prompt), c).unwrap();
        }
        let mut single = caches.clone();
        let ids = [step_id(7, 0), step_id(7, 1), step_id(7, 2)];
        let mut refs: Vec<&mut lm::KvCache> = caches.iter_mut().collect();
        let h = lm
            .model
            .forward_batch(&lm.model.embed(&ids).unwrap(), &mut refs)
            .unwrap();
        for (i, c) in single.iter_mut().enumerate() {
            let want = lm.model.forward(Input::Tokens(&ids[i..=i]), c).unwrap();
            let bits = |t: &lm::candle::Tensor| -> Vec<u32> {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            assert!(
                bits(&h.narrow(0, i, 1).unwrap()) == bits(&want),
                "{alias} row {i}"
            );
        }
    }
}

/// A prompt evaluated in pieces (a cached prefix, then the rest, or chunks of any size) gives
/// every position the same bits as one forward of it all, on both default models, past
/// Gemma's 512-position sliding window too: what lets a prime resume from the prefix cache at
/// any position and still replay a seed.
#[test]
fn a_prompt_split_anywhere_gives_the_same_bits_as_one_forward() {
    for alias in MODELS {
        let lm = by_alias(alias);
        let text = "The tide comes in over the flats, the gulls lift, and the lamps are lit. ";
        let ids = lm.raw_prompt(&text.repeat(40)).unwrap()[..600].to_vec();
        let rows = |h: &lm::candle::Tensor| -> Vec<Vec<f32>> { h.to_vec2().unwrap() };
        let mut whole = lm.model.new_cache();
        let want = rows(&lm.model.forward(Input::Tokens(&ids), &mut whole).unwrap());
        let mut split = lm.model.new_cache();
        let mut got = Vec::new();
        let cuts = [0, 1, 37, 300, 513, 599, 600];
        for w in cuts.windows(2) {
            let h = lm
                .model
                .forward(Input::Tokens(&ids[w[0]..w[1]]), &mut split)
                .unwrap();
            got.extend(rows(&h));
        }
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{alias}: position {i} differs by {}",
                max_abs_diff(a, b)
            );
        }
    }
}
