//! Agreement with llama.cpp on the same GGUF files: tokenizer ids and teacher-forced greedy
//! continuations. The fixtures and the command that made them: `tests/fixtures/make_reference.py`.

mod common;

use common::{by_alias, fixture};
use lm::Input;

fn check_tokenizer(alias: &str) {
    let lm = by_alias(alias);
    let fx = fixture(&format!("tokenizer_{alias}.json"));
    let mut failures = Vec::new();
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = lm.tokenizer.encode(text, true).unwrap();
        if got != want {
            failures.push(format!("{text:?}: ours {got:?} llama.cpp {want:?}"));
        }
        // Round trip: decoding what we encoded gives the text back (BOS skipped as special).
        let back = lm.tokenizer.decode(&got, false).unwrap();
        let bos = lm
            .tokenizer
            .bos()
            .and_then(|b| lm.tokenizer.token_piece(b))
            .unwrap_or_default();
        let back = if lm.tokenizer.add_bos() {
            back.strip_prefix(&bos).unwrap_or(&back).to_string()
        } else {
            back
        };
        if back != text {
            failures.push(format!("{text:?}: decode(encode) = {back:?}"));
        }
    }
    assert!(failures.is_empty(), "{alias}:\n{}", failures.join("\n"));
}

#[test]
fn smollm_tokenizer_matches_llama_cpp() {
    check_tokenizer("smollm2-135m");
}

#[test]
fn gemma_tokenizer_matches_llama_cpp() {
    check_tokenizer("gemma3-270m");
}

#[test]
fn chat_markers_are_single_special_ids_and_user_text_cannot_inject_them() {
    let lm = common::smollm();
    let im_start = lm.tokenizer.token_to_id("<|im_start|>").unwrap();
    let ids = lm.tokenizer.encode("<|im_start|>user", true).unwrap();
    assert_eq!(ids[0], im_start);
    let plain = lm.tokenizer.encode("<|im_start|>user", false).unwrap();
    assert!(!plain.contains(&im_start) && plain.len() > 2, "{plain:?}");
    // The chat prompt from CANDLE-NOTES.md, without the default system message.
    let rendered = "<|im_start|>user\nThe capital of France is<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(
        lm.encode_rendered(rendered).unwrap(),
        vec![1, 4093, 198, 504, 3575, 282, 4649, 314, 2, 198, 1, 520, 9531, 198]
    );
}

/// Teacher-forces llama.cpp's 48-token greedy continuation through our model: at every
/// position our top token is the reference token, or — only where the reference's own top-1/
/// top-2 margin is below 0.5 — the reference token is our second.
fn check_golden(alias: &str) -> f32 {
    let lm = by_alias(alias);
    let fx = fixture(&format!("golden_{alias}.json"));
    let mut worst = 0f32;
    let mut failures = Vec::new();
    for case in fx["cases"].as_array().unwrap() {
        let ids = |k: &str| -> Vec<u32> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let prompt = ids("prompt_ids");
        let generated = ids("generated_ids");
        let mut all = prompt.clone();
        all.extend(&generated);
        let mut cache = lm.model.new_cache();
        let h = lm
            .model
            .forward(Input::Tokens(&all[..all.len() - 1]), &mut cache)
            .unwrap();
        let logits = lm
            .model
            .logits(&h.narrow(0, prompt.len() - 1, generated.len()).unwrap())
            .unwrap();
        for (i, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let row: Vec<f32> = logits.get(i).unwrap().to_vec1().unwrap();
            let mut order: Vec<u32> = (0..row.len() as u32).collect();
            order.select_nth_unstable_by(1, |a, b| row[*b as usize].total_cmp(&row[*a as usize]));
            let (first, second) = if row[order[0] as usize] >= row[order[1] as usize] {
                (order[0], order[1])
            } else {
                (order[1], order[0])
            };
            let want = generated[i];
            let margin = step["margin"].as_f64().unwrap() as f32;
            for pair in step["top"].as_array().unwrap() {
                let id = pair[0].as_u64().unwrap() as usize;
                worst = worst.max((row[id] - pair[1].as_f64().unwrap() as f32).abs());
            }
            // Where llama.cpp itself nearly ties (its top two within 0.5), rounding may order
            // the tied tokens differently: the reference token must then be within 0.5 of our
            // best, not necessarily first.
            let near_tie = margin < 0.5 && row[first as usize] - row[want as usize] < 0.5;
            let ok = first == want || near_tie;
            if !ok {
                failures.push(format!(
                    "{:?} step {i}: ours {first}/{second}, reference {want} (margin {margin})",
                    case["prompt"]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{alias}:\n{}", failures.join("\n"));
    eprintln!(
        "{alias}: max abs logit difference vs llama.cpp over the reference top-5: {worst:.4}"
    );
    worst
}

#[test]
fn smollm_golden_continuations_match_llama_cpp() {
    let worst = check_golden("smollm2-135m");
    // Both sides quantize activations differently; a broken layer is off by tens.
    assert!(worst < 3.0, "max abs logit difference {worst}");
}

#[test]
fn gemma_golden_continuations_match_llama_cpp() {
    let worst = check_golden("gemma3-270m");
    assert!(worst < 3.0, "max abs logit difference {worst}");
}

#[test]
fn token_bytes_spell_what_decoding_gives() {
    for alias in ["smollm2-135m", "gemma3-270m"] {
        let lm = by_alias(alias);
        let bytes = lm.tokenizer.all_token_bytes();
        assert_eq!(bytes.len(), lm.tokenizer.vocab_size());
        let ids = lm
            .tokenizer
            .encode("Hello, wörld! 東京 🦀\n  x", false)
            .unwrap();
        let ids: Vec<u32> = ids
            .into_iter()
            .filter(|&i| Some(i) != lm.tokenizer.bos())
            .collect();
        let joined: Vec<u8> = ids
            .iter()
            .flat_map(|&i| bytes[i as usize].clone())
            .collect();
        assert_eq!(
            String::from_utf8(joined).unwrap(),
            "Hello, wörld! 東京 🦀\n  x",
            "{alias}"
        );
    }
}
