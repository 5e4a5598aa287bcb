//! `majordomo critique` as our acceptance checks use it: `--json` prints exactly the schema's
//! object on one line, whatever the draft's source; bad input names the flag.

use majordomo::critique::Critique;
use std::io::Write;
use std::process::{Command, Stdio};

fn critique(args: &[&str], stdin: &[u8]) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_majordomo"))
        .arg("critique")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn json_is_one_valid_critique_per_run_from_any_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("draft.txt");
    std::fs::write(&file, "The moon is a lamp the sea forgot to switch off.").unwrap();
    let runs = [
        critique(
            &[
                "--request",
                "A line about the moon",
                "--draft",
                "The moon hums over the harbour.",
                "--json",
            ],
            b"",
        ),
        critique(
            &[
                "--request",
                "A line about the moon",
                "--draft-file",
                file.to_str().unwrap(),
                "--json",
            ],
            b"",
        ),
        critique(
            &["--request", "A line about the moon", "--json"],
            "Moon moon moon moon moon moon moon moon moon moon moon moon moon moon.".as_bytes(),
        ),
    ];
    for (ok, stdout, stderr) in runs {
        assert!(ok, "{stderr}");
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        Critique::parse(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    }
}

#[test]
fn bad_input_is_named() {
    let (ok, _, stderr) = critique(&["--request", "x", "--json"], b"\xff\xfe");
    assert!(!ok && stderr.contains("not valid UTF-8"), "{stderr}");
    let (ok, _, stderr) = critique(&["--request", " ", "--draft", "x"], b"");
    assert!(!ok && stderr.contains("--request"), "{stderr}");
    let (ok, _, stderr) = critique(&["--request", "x", "--draft-file", "/no/such/file"], b"");
    assert!(!ok && stderr.contains("--draft-file"), "{stderr}");
}
