//! The `muse` command line as our acceptance checks use it: `generate` writes only the text to
//! stdout, `dream --json` writes one object per step and a final `{"text": …}`, and bad flags
//! are named.

use std::process::Command;

fn muse(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_muse"))
        .args(args)
        .output()
        .expect("run muse");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn generate_streams_only_the_greedy_text() {
    let (ok, stdout, stderr) = muse(&[
        "generate",
        "--model",
        "smollm2-135m",
        "--chat",
        "The capital of France is",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--threads",
        "2",
    ]);
    assert!(ok, "{stderr}");
    let lm = lm::LoadedModel::load("smollm2-135m", &lm::LoadOptions::default()).unwrap();
    let ids = lm
        .chat_prompt(&[lm::ChatMessage::user("The capital of France is")])
        .unwrap();
    let opts = lm::GenerateOptions {
        sampling: lm::SamplingParams::greedy(),
        max_tokens: 8,
        ..Default::default()
    };
    let want = lm::generate(&lm, &ids, &opts, |_| {}).unwrap().text;
    assert_eq!(stdout, format!("{want}\n"));
}

#[test]
fn dream_json_has_a_line_per_step_and_the_text_last() {
    let (ok, stdout, stderr) = muse(&[
        "dream",
        "--model",
        "smollm2-135m",
        "--chat",
        "The capital of France is",
        "--steps",
        "3",
        "--commit-tokens",
        "5",
        "--seed",
        "1",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    for (i, l) in lines[..3].iter().enumerate() {
        assert_eq!(l["step"], i);
        assert!(l["entropy"].as_f64().unwrap() >= 0.0);
        let top = l["top"].as_array().unwrap();
        assert!(
            !top.is_empty()
                && top[0]["id"].is_u64()
                && top[0]["text"].is_string()
                && top[0]["p"].is_f64()
        );
        assert!(l["nearest"]["cosine"].is_f64());
    }
    assert!(lines[3]["text"].is_string());
    // The table form carries the same steps.
    let (ok, table, _) = muse(&[
        "dream",
        "--model",
        "smollm2-135m",
        "--chat",
        "hi",
        "--steps",
        "2",
        "--commit-tokens",
        "3",
    ]);
    assert!(
        ok && table.lines().next().unwrap().contains("entropy") && table.contains("cosine"),
        "{table}"
    );
}

#[test]
fn bad_flags_are_named() {
    for (args, needle) in [
        (
            vec!["generate", "--chat", "hi", "--temperature", "-1"],
            "--temperature",
        ),
        (vec!["generate", "--chat", "hi", "--top-p", "0"], "--top-p"),
        (vec!["dream", "--chat", "hi", "--top-k", "0"], "--top-k"),
        (vec!["dream", "--chat", "hi", "--noise", "-0.5"], "--noise"),
        (
            vec!["generate", "--model", "nope", "--chat", "hi"],
            "model `nope`",
        ),
    ] {
        let (ok, stdout, stderr) = muse(&args);
        assert!(!ok && stdout.is_empty(), "{args:?}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn shape_bench_runs_a_random_model_and_reports_every_figure() {
    let (ok, stdout, stderr) = muse(&[
        "bench",
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--decode-tokens",
        "4",
        "--repeats",
        "1",
        "--batch",
        "3",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["vocab"], 512);
    assert_eq!(r["batch"], 3);
    assert_eq!(r["fused_cuda_path"], false);
    for key in [
        "decode_tokens_per_s",
        "batch_aggregate_tokens_per_s",
        "latent_steps_per_s_concept",
        "latent_steps_per_s_hidden",
        "latent_steps_per_s_blend",
        "concurrent_sessions_aggregate_latent_steps_per_s",
    ] {
        assert!(r[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {r}");
    }
    // The bound needs a GPU's copy bandwidth; on the CPU it is not reported.
    assert!(r.get("decode_fraction_of_bound").is_none());
}

#[test]
fn a_cuda_device_in_a_cpu_build_or_a_bad_device_is_named() {
    let (ok, _, stderr) = muse(&["bench", "--shape", "tiny", "--device", "tpu:0"]);
    assert!(!ok);
    assert!(
        stderr.contains("--device") && stderr.contains("cuda:<ordinal>"),
        "{stderr}"
    );
    let (ok, _, stderr) = muse(&["bench", "--shape", "nope", "--device", "cpu"]);
    assert!(!ok);
    assert!(
        stderr.contains("--shape") && stderr.contains("qwen2.5-1.5b"),
        "{stderr}"
    );
    let (ok, _, stderr) = muse(&["bench", "--sessions", "1,0"]);
    assert!(!ok);
    assert!(
        stderr.contains("--sessions takes counts from 1 to 64"),
        "{stderr}"
    );
    let (ok, _, stderr) = muse(&["bench", "--reference", "ref.json"]);
    assert!(!ok);
    assert!(
        stderr.contains("--reference needs --shape or --weights"),
        "{stderr}"
    );
    let (ok, _, stderr) = muse(&[
        "bench",
        "--shape",
        "tiny",
        "--reference",
        "/nonexistent/ref.json",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--reference /nonexistent/ref.json"),
        "{stderr}"
    );
    if cfg!(not(feature = "cuda")) {
        let (ok, _, stderr) = muse(&["bench", "--shape", "tiny", "--device", "cuda:0"]);
        assert!(!ok);
        assert!(stderr.contains("--features cuda"), "{stderr}");
    }
}
