//! Loading: safetensors models against the GGUF they came from, and bad input of every kind
//! ending in a typed error that says what to do.

mod common;

use common::max_abs_diff;
use lm::candle::quantized::gguf_file;
use lm::candle::{DType, Device, Tensor};
use lm::Input;
use lm::{LmError, LoadOptions, LoadedModel};
use std::collections::HashMap;
use std::path::Path;

fn smollm_path() -> std::path::PathBuf {
    common::smollm().path.clone()
}

/// GGUF llama q/k rows were permuted for ggml's interleaved rope; HF layout undoes that.
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, out / heads / 2, 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

/// Writes SmolLM2's dequantized weights as an HF-layout safetensors model in `dtype`.
fn write_hf_model(dir: &Path, dtype: DType) {
    let path = smollm_path();
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut get = |name: &str| {
        content
            .tensor(&mut f, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
    };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), get("token_embd.weight"));
    t.insert("model.norm.weight".into(), get("output_norm.weight"));
    for i in 0..30 {
        let g = |s: &str| format!("blk.{i}.{s}.weight");
        let h = |s: &str| format!("model.layers.{i}.{s}.weight");
        t.insert(h("input_layernorm"), get(&g("attn_norm")));
        t.insert(h("post_attention_layernorm"), get(&g("ffn_norm")));
        t.insert(h("self_attn.q_proj"), unpermute(&get(&g("attn_q")), 9));
        t.insert(h("self_attn.k_proj"), unpermute(&get(&g("attn_k")), 3));
        t.insert(h("self_attn.v_proj"), get(&g("attn_v")));
        t.insert(h("self_attn.o_proj"), get(&g("attn_output")));
        t.insert(h("mlp.gate_proj"), get(&g("ffn_gate")));
        t.insert(h("mlp.up_proj"), get(&g("ffn_up")));
        t.insert(h("mlp.down_proj"), get(&g("ffn_down")));
    }
    let t: HashMap<String, Tensor> = t
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
        .collect();
    lm::candle::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": true, "torch_dtype": format!("{dtype:?}").to_lowercase(),
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        common::smollm().tokenizer.to_json().unwrap(),
    )
    .unwrap();
    let tc = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

fn last_logits(lm: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    let mut cache = lm.model.new_cache();
    lm.model
        .last_logits(&lm.model.forward(Input::Tokens(ids), &mut cache).unwrap())
        .unwrap()
}

#[test]
fn safetensors_f32_and_bf16_match_the_gguf_they_came_from() {
    let reference = common::dequantized("smollm2-135m");
    let ids = reference
        .chat_prompt(&[lm::ChatMessage::user("Name a large city.")])
        .unwrap();
    let want = last_logits(reference, &ids);
    for (dtype, tolerance) in [(DType::F32, 1e-3), (DType::BF16, 1.5)] {
        let dir = tempfile::tempdir().unwrap();
        write_hf_model(dir.path(), dtype);
        let st = LoadedModel::load_path(dir.path(), &LoadOptions::default()).unwrap();
        assert_eq!(st.model.config().arch, lm::Architecture::Llama);
        assert_eq!(
            st.tokenizer.encode("Hello, world", true).unwrap(),
            reference.tokenizer.encode("Hello, world", true).unwrap()
        );
        let got = last_logits(&st, &ids);
        let d = max_abs_diff(&got, &want);
        assert!(d < tolerance, "{dtype:?}: max abs logit diff {d}");
        assert_eq!(
            lm::argmax(&got),
            lm::argmax(&want),
            "{dtype:?}: top token differs"
        );
        // The repo's own chat template and special tokens are used.
        assert!(st.chat.is_native());
        assert_eq!(st.tokenizer.bos(), st.tokenizer.token_to_id("<|im_start|>"));
        drop(st);
        // config.json is checked like GGUF metadata: against sense and against the tensors.
        let config_path = dir.path().join("config.json");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        for (key, value, expected) in [
            (
                "num_attention_heads",
                serde_json::json!(0),
                "head count is 0",
            ),
            ("rms_norm_eps", serde_json::json!(0.0), "norm epsilon 0"),
            (
                "hidden_size",
                serde_json::json!(630),
                "token embedding is 49152x576",
            ),
            ("num_hidden_layers", serde_json::json!(40), "says 40 layers"),
            (
                "num_hidden_layers",
                serde_json::json!(10_000_000_000u64),
                "layers",
            ),
            (
                "vocab_size",
                serde_json::json!(10),
                "token embedding is 49152x576",
            ),
        ] {
            let mut bad = config.clone();
            bad[key] = value.clone();
            std::fs::write(&config_path, bad.to_string()).unwrap();
            let err = LoadedModel::load_path(dir.path(), &LoadOptions::default())
                .err()
                .unwrap_or_else(|| panic!("{key} = {value} loaded"));
            assert!(err.to_string().contains(expected), "{key} = {value}: {err}");
        }
        std::fs::write(&config_path, config.to_string()).unwrap();
    }
}

fn load_err(spec: &str) -> String {
    match LoadedModel::load(spec, &LoadOptions::default()) {
        Ok(_) => panic!("{spec} loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_alias_and_missing_file_say_what_to_use() {
    let e = load_err("smolm2");
    assert!(
        e.contains("unknown model alias `smolm2`") && e.contains("smollm2-135m, gemma3-270m"),
        "{e}"
    );
    let e = load_err("/no/such/model.gguf");
    assert!(
        e.contains("not found") && e.contains("/no/such/model.gguf"),
        "{e}"
    );
}

#[test]
fn truncated_or_garbage_gguf_is_corrupt_not_a_panic() {
    let src = std::fs::read(smollm_path()).unwrap();
    // Found by the gguf fuzz target: a tensor of shape [4, 0] aborted inside candle.
    let empty_shape = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/gguf/crash-empty-tensor-shape"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("header.gguf", &src[..1000]),
        ("half.gguf", &src[..src.len() / 2]),
        ("junk.gguf", &b"not a model at all"[..]),
        ("empty-shape.gguf", &empty_shape[..]),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let err = LoadedModel::load_path(&p, &LoadOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{name} loaded"));
        assert!(matches!(err, LmError::Corrupt { .. }), "{name}: {err:?}");
        assert!(err.to_string().contains("fetch it again"), "{name}: {err}");
    }
}

/// Where a GGUF metadata key's value starts (after its type tag) in the file's bytes.
fn value_offset(bytes: &[u8], key: &str) -> usize {
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{key} is not in the file"));
    at + needle.len() + 4
}

#[test]
fn metadata_that_contradicts_the_tensors_or_sense_is_refused_by_name() {
    let mut bytes = std::fs::read(smollm_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("patched.gguf");
    let int = |n: u32| n.to_le_bytes();
    // SmolLM2-135M: 576 wide, 30 layers, 9 heads of 64, 3 kv heads, ffn 1536.
    for (key, value, expected) in [
        ("llama.attention.head_count", int(0), "head count is 0"),
        (
            "llama.attention.head_count_kv",
            int(0),
            "kv head count is 0",
        ),
        (
            "llama.attention.head_count_kv",
            int(2),
            "not divisible by 2 kv heads",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            f32::NAN.to_le_bytes(),
            "norm epsilon NaN",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            (-1e-5f32).to_le_bytes(),
            "norm epsilon",
        ),
        ("llama.rope.freq_base", 0f32.to_le_bytes(), "rope base 0"),
        (
            "llama.rope.freq_base",
            f32::INFINITY.to_le_bytes(),
            "rope base inf",
        ),
        (
            "llama.embedding_length",
            int(577),
            "token embedding is 49152x576",
        ),
        (
            "llama.rope.dimension_count",
            int(0),
            "rope.dimension_count is 0",
        ),
        (
            "llama.rope.dimension_count",
            int(65),
            "rope.dimension_count is 65",
        ),
        ("llama.vocab_size", int(10), "vocab_size is 10"),
        ("llama.context_length", int(0), "context length is 0"),
        ("llama.block_count", int(31), "block_count says 31"),
        (
            "llama.feed_forward_length",
            int(1000),
            "gate projection is 1536x576",
        ),
    ] {
        let at = value_offset(&bytes, key);
        let original: Vec<u8> = bytes[at..at + 4].to_vec();
        bytes[at..at + 4].copy_from_slice(&value);
        std::fs::write(&p, &bytes).unwrap();
        bytes[at..at + 4].copy_from_slice(&original);
        let err = LoadedModel::load_path(&p, &LoadOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{key} = {value:?} loaded"));
        assert!(matches!(err, LmError::BadModel(_)), "{key}: {err:?}");
        assert!(err.to_string().contains(expected), "{key}: {err}");
    }
}

#[test]
fn a_nan_in_the_weights_is_an_error_not_empty_text() {
    let mut bytes = std::fs::read(smollm_path()).unwrap();
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
    let norm = &content.tensor_infos["output_norm.weight"];
    assert_eq!(norm.ggml_dtype, lm::candle::quantized::GgmlDType::F32);
    let at = (content.tensor_data_offset + norm.offset) as usize;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nan.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let lm = LoadedModel::load_path(&p, &LoadOptions::default()).unwrap();
    let prompt = lm.raw_prompt("Once upon a time").unwrap();
    let err = lm::generate(&lm, &prompt, &Default::default(), |_| {})
        .expect_err("NaN weights generated text");
    assert!(matches!(err, LmError::NonFiniteLogits), "{err:?}");
}

#[test]
fn wrong_sha256_is_a_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(lm::ALIASES[0].file);
    std::fs::write(&p, b"tampered").unwrap();
    let err = lm::verify(&lm::ALIASES[0], &p).unwrap_err();
    assert!(matches!(err, LmError::Checksum { .. }), "{err:?}");
    assert!(
        err.to_string().contains("delete it and fetch again"),
        "{err}"
    );
    // The real file verifies.
    lm::verify(&lm::ALIASES[0], &smollm_path()).unwrap();
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mamba.gguf");
    let mut f = std::fs::File::create(&p).unwrap();
    let t = lm::candle::quantized::QTensor::quantize(
        &Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap(),
        lm::candle::quantized::GgmlDType::F32,
    )
    .unwrap();
    let arch = gguf_file::Value::String("mamba".into());
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &t)],
    )
    .unwrap();
    drop(f);
    let err = LoadedModel::load_path(&p, &LoadOptions::default())
        .err()
        .expect("mamba loaded");
    assert!(
        matches!(err, LmError::UnsupportedArchitecture(ref a) if a == "mamba"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("llama") && err.to_string().contains("gemma3"),
        "{err}"
    );
}

#[test]
fn prompt_longer_than_the_context_is_a_typed_error() {
    let opts = LoadOptions {
        max_context: Some(32),
        ..Default::default()
    };
    let lm = LoadedModel::load_path(&smollm_path(), &opts).unwrap();
    assert_eq!(lm.model.max_context(), 32);
    let ids: Vec<u32> = (100..140).collect();
    let mut cache = lm.model.new_cache();
    let err = lm
        .model
        .forward(Input::Tokens(&ids), &mut cache)
        .unwrap_err();
    assert!(
        matches!(
            err,
            LmError::ContextOverflow {
                needed: 40,
                limit: 32
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("shorten the prompt"), "{err}");
    assert_eq!(
        cache.len(),
        0,
        "a failed forward must leave the cache as it was"
    );
    let g = lm::generate(&lm, &ids, &Default::default(), |_| {}).unwrap_err();
    assert!(matches!(g, LmError::ContextOverflow { .. }));
}
