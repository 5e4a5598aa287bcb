//! Replays the committed corpus (fuzz/corpus/<target>/: the seeds and every input that once
//! crashed a harness) through the harnesses, so a fixed crash stays fixed without a fuzzer.

fn replay(target: &str, harness: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        eprintln!("{target}: {}", path.display());
        harness(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n > 0, "{} is empty", dir.display());
}

#[test]
fn gguf_corpus() {
    replay("gguf", mm_fuzz::gguf);
}

#[test]
fn tokenizer_corpus() {
    replay("tokenizer", mm_fuzz::tokenizer);
}

#[test]
fn chat_template_corpus() {
    replay("chat_template", mm_fuzz::chat_template);
}

#[test]
fn requests_corpus() {
    replay("requests", mm_fuzz::requests);
}
