//! `mm eval --grid quick` end to end on the real services and models: every setting gets its
//! figures, plain sampling included, and the frontier plot is drawn. Bad input is named.

use std::process::Command;

fn mm_eval() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mm-eval"))
}

#[test]
fn a_quick_grid_writes_results_and_a_frontier() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "Write a haiku about the sea.\n\nSuggest a name for a friendly dragon.\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let run = |args: &[&str]| {
        let o = mm_eval()
            .args([
                "--prompts",
                prompts.to_str().unwrap(),
                "--samples",
                "2",
                "--grid",
                "quick",
            ])
            .args(["--out", out.to_str().unwrap(), "--threads", "1"])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let table = run(&[]);
    assert!(table.contains("| plain-t0.7 (plain) |"), "{table}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let settings = results["settings"].as_array().unwrap();
    assert_eq!(settings.len(), 3);
    for s in settings {
        assert_eq!(s["samples"], 4, "{s}");
        for key in [
            "judge_nll",
            "broken_word_rate",
            "distinct_2_across",
            "self_bleu",
            "embedding_distance",
            "accept_rate",
            "turn_ms",
        ] {
            let v = s[key].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite(), "{key} of {}: {v}", s["name"]);
        }
        let nll = s["judge_nll"].as_f64().unwrap();
        assert!((0.5..10.0).contains(&nll), "{}: judge NLL {nll}", s["name"]);
    }
    assert!(settings.iter().any(|s| s["plain"] == true));
    assert!(settings.iter().any(|s| s["pareto"] == true));
    let dreamt = settings.iter().find(|s| s["name"] == "default").unwrap();
    assert!(dreamt["latent_steps_per_reply"].as_f64().unwrap() > 0.0);
    let svg = std::fs::read_to_string(out.join("frontier.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("plain-t0.7"));
    // A rerun resumes: nothing left to generate, the same samples.
    let lines = std::fs::read_to_string(out.join("samples.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(lines, 12);
    run(&[]);
    let again = std::fs::read_to_string(out.join("samples.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(again, 12);
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n \n").unwrap();
    for (args, needle) in [
        (vec!["--prompts", empty.to_str().unwrap()], "--prompts"),
        (vec!["--grid", "/no/such.toml"], "--grid /no/such.toml"),
        (vec!["--samples", "0"], "--samples"),
    ] {
        let o = mm_eval()
            .args(&args)
            .args(["--out", dir.path().join("o").to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
    }
}
