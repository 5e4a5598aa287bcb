//! Fuzz harnesses. Each takes arbitrary bytes and drives one way hostile input enters the
//! system: model files (GGUF metadata and tensors), the tokenizer a GGUF describes, the chat
//! template a model brings, and the request messages of the muse and the orchestrator.
//! An error is the expected outcome; a panic, an abort, a hang or a runaway allocation is a bug.
//! libFuzzer drives them (fuzz_targets/), and tests/corpus.rs replays the committed corpus.

use arbitrary::{Arbitrary, Unstructured};
use lm::candle::quantized::gguf_file::{self, Value};
use prost::Message;
use std::path::PathBuf;
use std::sync::OnceLock;

/// A file in this process's scratch directory holding `bytes` (the loaders read paths).
fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("a scratch directory"));
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("the scratch directory is writable");
    path
}

/// A model file: loaded whole (metadata, tensors, tokenizer, chat template), and when it
/// loads, two generated tokens.
pub fn gguf(data: &[u8]) {
    let path = scratch("model.gguf", data);
    let opts = lm::LoadOptions {
        max_context: Some(32),
        ..Default::default()
    };
    let Ok(model) = lm::LoadedModel::load_path(&path, &opts) else {
        return;
    };
    let decode = lm::GenerateOptions {
        max_tokens: 2,
        ..Default::default()
    };
    if let Ok(prompt) = model.raw_prompt("Hi there") {
        let _ = lm::generate(&model, &prompt, &decode, |_| {});
    }
}

/// What a GGUF's `tokenizer.ggml.*` metadata may say.
#[derive(Arbitrary, Debug)]
struct TokenizerMetadata {
    llama: bool,
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    merges: Vec<String>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: Option<bool>,
    pre: Option<String>,
    text: String,
}

/// The tokenizer built from GGUF metadata: built, then encoding and decoding a text.
pub fn tokenizer(data: &[u8]) {
    let Ok(t) = TokenizerMetadata::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let mut meta = vec![
        (
            "tokenizer.ggml.model",
            Value::String(if t.llama { "llama" } else { "gpt2" }.into()),
        ),
        ("tokenizer.ggml.tokens", strings(t.tokens)),
        (
            "tokenizer.ggml.scores",
            Value::Array(t.scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(t.types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges", strings(t.merges)),
    ];
    meta.extend(
        t.bos
            .map(|b| ("tokenizer.ggml.bos_token_id", Value::U32(b))),
    );
    meta.extend(
        t.eos
            .map(|e| ("tokenizer.ggml.eos_token_id", Value::U32(e))),
    );
    meta.extend(
        t.add_bos
            .map(|b| ("tokenizer.ggml.add_bos_token", Value::Bool(b))),
    );
    meta.extend(t.pre.map(|p| ("tokenizer.ggml.pre", Value::String(p))));
    let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let mut bytes = Vec::new();
    if gguf_file::write(&mut std::io::Cursor::new(&mut bytes), &refs, &[]).is_err() {
        return;
    }
    let path = scratch("tokenizer.gguf", &bytes);
    let Ok(file) = lm::GgufFile::open(&path) else {
        return;
    };
    let Ok(tok) = lm::Tokenizer::from_gguf(&file) else {
        return;
    };
    if let Ok(ids) = tok.encode(&t.text, true) {
        let _ = tok.decode(&ids, false);
    }
}

/// A chat template a model file brings, and a conversation to render with it.
#[derive(Arbitrary, Debug)]
struct Conversation {
    template: String,
    messages: Vec<(String, String)>,
    add_generation_prompt: bool,
}

/// Chat-template rendering: parse (and the trial render at load), then the conversation.
pub fn chat_template(data: &[u8]) {
    let Ok(c) = Conversation::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let Ok(t) = lm::ChatTemplate::new(Some(c.template), "<s>".into(), "</s>".into(), |_| true)
    else {
        return;
    };
    let messages: Vec<lm::ChatMessage> = c
        .messages
        .into_iter()
        .map(|(role, content)| lm::ChatMessage::new(role, content))
        .collect();
    let _ = t.render(&messages, c.add_generation_prompt);
}

/// Request messages as they come off the wire: the first byte picks the message, the rest is
/// decoded as it and validated as the service would before doing any work.
pub fn requests(data: &[u8]) {
    use mm_proto::muse::v1 as upb;
    use mm_proto::orchestrator::v1 as pb;
    use orchestrator::policy::TurnPolicy;
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let policy = |p: Option<pb::DreamPolicy>| {
        let _ = TurnPolicy::resolve(&p.unwrap_or_default(), &TurnPolicy::default());
    };
    match which % 3 {
        0 => {
            let Ok(c) = upb::ClientCommand::decode(bytes) else {
                return;
            };
            match c.command {
                Some(upb::client_command::Command::Prime(p)) => {
                    let _ = muse::convert::prime(&p);
                }
                Some(upb::client_command::Command::Burst(b)) => {
                    let _ = muse::dream::DreamParams::try_from(&b);
                }
                Some(upb::client_command::Command::Commit(c)) => {
                    let _ = muse::convert::commit(&c, 4096);
                }
                _ => {}
            }
        }
        1 => {
            if let Ok(r) = pb::TurnRequest::decode(bytes) {
                policy(r.policy);
            }
        }
        _ => {
            if let Ok(r) = pb::CreateSessionRequest::decode(bytes) {
                policy(r.policy);
            }
        }
    }
}
