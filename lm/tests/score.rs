//! The NLL of a continuation (what the majordomo's fluency and the dream lab's judge report)
//! against llama.cpp's figure on the same ids (`tests/fixtures/make_judge_nll.py` made it).

use lm::{LoadOptions, LoadedModel};

#[test]
fn continuation_nll_matches_llama_cpp() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/judge_nll.json");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for alias in ["gemma3-270m", "smollm2-135m"] {
        let lm = LoadedModel::load(alias, &LoadOptions::default()).unwrap();
        let mut ours_by_case = Vec::new();
        for case in fx["cases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["model"] == alias)
        {
            let (ctx, cont) = (ids(&case["context_ids"]), ids(&case["continuation_ids"]));
            // Our tokenizer gives llama.cpp's ids.
            let text = case["continuation"].as_str().unwrap();
            assert_eq!(
                lm.tokenizer.encode_with(text, false, false).unwrap(),
                cont,
                "{alias}: {text:?}"
            );
            let got = lm::continuation_nll(&lm, &ctx, &cont).unwrap();
            let want = case["nll"].as_f64().unwrap();
            assert_eq!(got.tokens, cont.len());
            // Quantized activations round differently: measured within 1%.
            assert!(
                (got.mean as f64 - want).abs() < 0.03 * want,
                "{alias} {text:?}: ours {} vs llama.cpp {want}",
                got.mean
            );
            ours_by_case.push(got.mean);
        }
        // The fluent continuation scores better than the broken, looping one.
        assert!(
            ours_by_case[0] < ours_by_case[2],
            "{alias}: {ours_by_case:?}"
        );
    }
    let lm = LoadedModel::load("smollm2-135m", &LoadOptions::default()).unwrap();
    assert!(lm::continuation_nll(&lm, &[], &[1]).is_err());
    // Scoring rows of a forward run for something else: one row per target, or a clear error.
    let mut cache = lm.model.new_cache();
    let hidden = lm
        .model
        .forward(lm::Input::Tokens(&[1, 2, 3]), &mut cache)
        .unwrap();
    let err = lm::rows_nll(&lm, &hidden, &[2, 3]).unwrap_err().to_string();
    assert!(err.contains("3 rows for 2 targets"), "{err}");
    let rows = lm::rows_nll(&lm, &hidden.narrow(0, 0, 2).unwrap(), &[2, 3]).unwrap();
    let whole = lm::continuation_nll(&lm, &[1], &[2, 3]).unwrap();
    assert_eq!(rows, whole);
}
