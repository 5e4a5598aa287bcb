//! Tokenizers built from GGUF metadata (or a repo's `tokenizer.json`).
//!
//! `tokenizer.ggml.model = gpt2`: byte-level BPE from tokens + merges, pre-tokenized per
//! `tokenizer.ggml.pre`. `= llama`: SentencePiece, rebuilt the way HF converts it — a BPE whose
//! merges come from the piece scores, with byte fallback (a Unigram model from the same scores
//! splits words wrongly). Control tokens become special tokens that map to single ids.

use crate::error::{LmError, Result};
use crate::model::GgufFile;
use ahash::AHashMap;
use candle_core::quantized::gguf_file::Value;
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Special-token texts that end an assistant turn in the chat formats we know.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|endoftext|>",
    "</s>",
];

#[derive(Clone)]
pub struct Tokenizer {
    /// Matches special-token text in its input (for rendered chat templates).
    special: tokenizers::Tokenizer,
    /// Treats special-token text as plain text (for user text that must not inject markers).
    plain: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    end_of_turn: Vec<u32>,
    vocab_size: usize,
    pieces: PieceEncoding,
    /// Per token: what its text looks like at its edges (see [`edge`]); built on first use.
    edges: std::sync::OnceLock<Vec<u8>>,
}

/// How vocabulary pieces spell bytes, read off the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceEncoding {
    /// GPT-2 byte-level: each byte is a printable stand-in character.
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xNN>` is one raw byte.
    SentencePiece,
    /// Anything else: decode the token on its own.
    Decoded,
}

fn piece_encoding(tk: &tokenizers::Tokenizer) -> PieceEncoding {
    match tk.get_decoder() {
        Some(DecoderWrapper::ByteLevel(_)) => PieceEncoding::ByteLevel,
        Some(DecoderWrapper::Sequence(seq))
            if seq
                .get_decoders()
                .iter()
                .any(|d| matches!(d, DecoderWrapper::ByteFallback(_))) =>
        {
            PieceEncoding::SentencePiece
        }
        _ => PieceEncoding::Decoded,
    }
}

/// GPT-2's byte ↔ printable-character table, inverted: character → byte.
fn byte_level_inverse() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<char> = printable.iter().map(|&b| b as char).collect();
    let mut n = 0u32;
    for b in 0..=255u8 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(char::from_u32(256 + n).expect("valid char"));
            n += 1;
        }
    }
    chars.into_iter().zip(printable).collect()
}

fn tok_err(e: impl std::fmt::Display) -> LmError {
    LmError::Tokenizer(e.to_string())
}

/// Each token's `(start, end)` byte range in the encoded text.
pub type ByteRanges = Vec<(usize, usize)>;

impl Tokenizer {
    /// From a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.str("tokenizer.ggml.model")?;
        let tokens: Vec<String> = string_array(gguf, "tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match gguf.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let bos = gguf.u32("tokenizer.ggml.bos_token_id").ok();
        let eos = gguf.u32("tokenizer.ggml.eos_token_id").ok();
        let add_bos = match gguf.get("tokenizer.ggml.add_bos_token") {
            Some(v) => v.to_bool().unwrap_or(false),
            None => model == "llama",
        };
        let add_space_prefix = gguf
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(model == "llama");
        let vocab: AHashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut tk = match model {
            "gpt2" => {
                let merges = string_array(gguf, "tokenizer.ggml.merges")?
                    .into_iter()
                    .map(|m| match m.split_once(' ') {
                        Some((a, b)) => Ok((a.to_string(), b.to_string())),
                        None => Err(LmError::Tokenizer(format!("malformed merge `{m}`"))),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .build()
                    .map_err(tok_err)?;
                let mut tk = tokenizers::Tokenizer::new(bpe);
                let pre = gguf.str("tokenizer.ggml.pre").unwrap_or("default");
                tk.with_pre_tokenizer(Some(gpt2_pre_tokenizer(pre)?));
                tk.with_decoder(Some(ByteLevelDecoder::default()));
                tk
            }
            "llama" => {
                let scores: Vec<f32> = match gguf.get("tokenizer.ggml.scores") {
                    Some(Value::Array(a)) => a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
                    _ => return Err(LmError::MissingMetadata("tokenizer.ggml.scores".into())),
                };
                let merges = merges_from_scores(&tokens, &scores, &vocab);
                let unk = gguf
                    .u32("tokenizer.ggml.unknown_token_id")
                    .ok()
                    .and_then(|i| tokens.get(i as usize))
                    .cloned();
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(unk) = unk {
                    builder = builder.unk_token(unk);
                }
                let mut tk = tokenizers::Tokenizer::new(builder.build().map_err(tok_err)?);
                let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
                if add_space_prefix {
                    normalizers.push(Prepend::new("▁".into()).into());
                }
                normalizers.push(Replace::new(" ", "▁").map_err(tok_err)?.into());
                tk.with_normalizer(Some(tokenizers::normalizers::Sequence::new(normalizers)))
                    .map_err(tok_err)?;
                let mut decoders: Vec<DecoderWrapper> = vec![
                    Replace::new("▁", " ").map_err(tok_err)?.into(),
                    ByteFallback::new().into(),
                    Fuse::new().into(),
                ];
                if add_space_prefix {
                    decoders.push(Strip::new(' ', 1, 0).into());
                }
                tk.with_decoder(Some(DecoderSequence::new(decoders)));
                tk
            }
            other => {
                return Err(LmError::Tokenizer(format!(
                    "unsupported tokenizer.ggml.model `{other}` (supported: gpt2, llama)"
                )))
            }
        };
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        tk.add_special_tokens(specials).map_err(tok_err)?;
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.clone(), false).normalized(false))
            .collect();
        tk.add_tokens(user).map_err(tok_err)?;
        if add_bos {
            let bos_id =
                bos.ok_or_else(|| LmError::MissingMetadata("tokenizer.ggml.bos_token_id".into()))?;
            let bos_text = tokens
                .get(bos_id as usize)
                .cloned()
                .ok_or_else(|| LmError::Tokenizer("bos id outside vocabulary".into()))?;
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos_text} $A"))
                .map_err(tok_err)?
                .special_tokens(vec![(bos_text, bos_id)])
                .build()
                .map_err(tok_err)?;
            tk.with_post_processor(Some(post));
        }
        Self::assemble(tk, bos, eos, add_bos, tokens.len())
    }

    /// From a `tokenizer.json`, with BOS/EOS from the repo's `tokenizer_config.json` if present.
    pub fn from_file(path: &Path, bos: Option<u32>, eos: Option<u32>) -> Result<Self> {
        let tk = tokenizers::Tokenizer::from_file(path).map_err(tok_err)?;
        let vocab = tk.get_vocab_size(true);
        // The post-processor (if any) already adds BOS.
        let add_bos = tk.get_post_processor().is_some() && bos.is_some();
        Self::assemble(tk, bos, eos, add_bos, vocab)
    }

    /// A stand-in for models without a tokenizer (random-weight benchmarks): token `i` is the
    /// word `<t{i}>`, words split on whitespace. No BOS, EOS or chat markers.
    pub fn synthetic(vocab: usize) -> Result<Self> {
        use tokenizers::models::wordlevel::WordLevel;
        let words: ahash::AHashMap<String, u32> =
            (0..vocab as u32).map(|i| (format!("<t{i}>"), i)).collect();
        let model = WordLevel::builder()
            .vocab(words.into_iter().collect())
            .unk_token("<t0>".into())
            .build()
            .map_err(tok_err)?;
        let mut tk = tokenizers::Tokenizer::new(model);
        tk.with_pre_tokenizer(Some(
            tokenizers::pre_tokenizers::whitespace::WhitespaceSplit,
        ));
        Self::assemble(tk, None, None, false, vocab)
    }

    fn assemble(
        special: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
        vocab_size: usize,
    ) -> Result<Self> {
        let mut plain = special.clone();
        plain.set_encode_special_tokens(true);
        let mut end_of_turn: Vec<u32> = END_OF_TURN_TEXTS
            .iter()
            .filter_map(|t| special.token_to_id(t))
            .collect();
        end_of_turn.extend(eos);
        end_of_turn.sort_unstable();
        end_of_turn.dedup();
        let pieces = piece_encoding(&special);
        Ok(Self {
            special,
            plain,
            bos,
            eos,
            add_bos,
            end_of_turn,
            vocab_size,
            pieces,
            edges: std::sync::OnceLock::new(),
        })
    }

    /// Encodes `text`, adding BOS when the model asks for it. With `parse_special`, special-token
    /// text (`<|im_start|>`) becomes its single id; without, it is encoded as plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        self.encode_with(text, parse_special, true)
    }

    /// Like [`encode`](Self::encode), choosing whether BOS may be added.
    pub fn encode_with(&self, text: &str, parse_special: bool, add_bos: bool) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text, parse_special, add_bos)?.0)
    }

    /// Like [`encode_with`](Self::encode_with), with each token's byte range in `text`
    /// (empty for added tokens such as BOS).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        parse_special: bool,
        add_bos: bool,
    ) -> Result<(Vec<u32>, ByteRanges)> {
        let tk = if parse_special {
            &self.special
        } else {
            &self.plain
        };
        let enc = tk.encode(text, add_bos && self.add_bos).map_err(tok_err)?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Decodes ids to text; special tokens are kept as their text unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.special.decode(ids, skip_special).map_err(tok_err)
    }

    /// The vocabulary entry of `id`, raw (e.g. `Ġthe`, `▁the`, `<0x0A>`).
    pub fn token_piece(&self, id: u32) -> Option<String> {
        self.special.id_to_token(id)
    }

    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.special.token_to_id(text)
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Ids that end a generation: EOS and the chat format's end-of-turn markers.
    pub fn end_of_turn(&self) -> &[u32] {
        &self.end_of_turn
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The tokenizer as a HF `tokenizer.json` document (e.g. to save a GGUF model in HF layout).
    pub fn to_json(&self) -> Result<String> {
        self.special.to_string(false).map_err(tok_err)
    }

    /// The bytes every token stands for, indexed by id (special tokens: their text). What a
    /// byte-level constraint engine (a token trie) needs; partial UTF-8 stays partial.
    pub fn all_token_bytes(&self) -> Vec<Vec<u8>> {
        (0..self.vocab_size as u32)
            .map(|id| self.token_bytes(id))
            .collect()
    }

    /// The bytes token `id` stands for (a special token: its text).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        static BYTE_LEVEL: std::sync::OnceLock<std::collections::HashMap<char, u8>> =
            std::sync::OnceLock::new();
        let piece = self.special.id_to_token(id).unwrap_or_default();
        if self.is_special(id) {
            return piece.into_bytes();
        }
        match self.pieces {
            PieceEncoding::ByteLevel => {
                let inverse = BYTE_LEVEL.get_or_init(byte_level_inverse);
                piece
                    .chars()
                    .filter_map(|c| inverse.get(&c).copied())
                    .collect()
            }
            PieceEncoding::SentencePiece => {
                match piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
                    Some(hex) if hex.len() == 2 => u8::from_str_radix(hex, 16)
                        .map(|b| vec![b])
                        .unwrap_or_default(),
                    _ => piece.replace('▁', " ").into_bytes(),
                }
            }
            PieceEncoding::Decoded => self
                .special
                .decode(&[id], false)
                .unwrap_or_default()
                .into_bytes(),
        }
    }

    /// Edge flags of every token, computed once (a 262k vocabulary takes ~0.1 s).
    fn edges(&self) -> &[u8] {
        self.edges.get_or_init(|| {
            self.all_token_bytes()
                .iter()
                .enumerate()
                .map(|(id, bytes)| {
                    if self.is_special(id as u32) {
                        edge::SPECIAL
                    } else {
                        edges(bytes)
                    }
                })
                .collect()
        })
    }

    fn edge(&self, id: u32) -> u8 {
        self.edges()
            .get(id as usize)
            .copied()
            .unwrap_or(edge::SPECIAL)
    }

    /// Whether `next` would start a new word after `last` (`None`: nothing before): `last`
    /// ends with a space or punctuation, or `next` begins with one, or either is special.
    pub fn at_word_boundary(&self, last: Option<u32>, next: u32) -> bool {
        last.is_none_or(|t| self.ends_word(t))
            || self.edge(next) & (edge::SPACE_START | edge::PUNCT_START | edge::SPECIAL) != 0
    }

    /// Whether the token's text ends a word: with a space or punctuation, or it is special.
    pub fn ends_word(&self, id: u32) -> bool {
        self.edge(id) & (edge::SPACE_END | edge::PUNCT_END | edge::SPECIAL) != 0
    }

    /// Whether the token's text ends with whitespace.
    pub fn ends_with_whitespace(&self, id: u32) -> bool {
        self.edge(id) & edge::SPACE_END != 0
    }

    /// A token as people read it, leading space included (`" Paris"`, not `ĠParis`).
    pub fn token_text(&self, id: u32) -> String {
        if self.is_special(id) {
            return self.token_piece(id).unwrap_or_default();
        }
        String::from_utf8_lossy(&self.token_bytes(id)).into_owned()
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special
            .get_added_vocabulary()
            .is_special_token(&self.special.id_to_token(id).unwrap_or_default())
    }
}

/// What a token's text looks like at its edges, for word boundaries.
mod edge {
    pub const SPACE_START: u8 = 1;
    pub const PUNCT_START: u8 = 2;
    pub const SPACE_END: u8 = 4;
    pub const PUNCT_END: u8 = 8;
    /// Special tokens (end of turn, markers) stand between words.
    pub const SPECIAL: u8 = 16;
}

/// Punctuation that separates words. Apostrophes and hyphens join them ("don't", "dream-like").
fn separates_words(c: char) -> bool {
    (c.is_ascii_punctuation() && c != '\'' && c != '-')
        || matches!(c, '—' | '–' | '“' | '”' | '…' | '«' | '»' | '¡' | '¿')
}

fn edges(bytes: &[u8]) -> u8 {
    let text = String::from_utf8_lossy(bytes);
    let mut e = 0;
    if let Some(c) = text.chars().next() {
        if c.is_whitespace() {
            e |= edge::SPACE_START;
        } else if separates_words(c) {
            e |= edge::PUNCT_START;
        }
    }
    if let Some(c) = text.chars().last() {
        if c.is_whitespace() {
            e |= edge::SPACE_END;
        } else if separates_words(c) {
            e |= edge::PUNCT_END;
        }
    }
    e
}

fn string_array(gguf: &GgufFile, key: &str) -> Result<Vec<String>> {
    match gguf.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| LmError::Tokenizer(format!("{key} holds a non-string")))
            })
            .collect(),
        _ => Err(LmError::MissingMetadata(key.into())),
    }
}

/// Regexes llama.cpp uses per `tokenizer.ggml.pre` (llama-vocab.cpp), for the byte-level BPEs.
fn gpt2_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(re.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tok_err)?;
        Ok(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    match pre {
        // SmolLM: individual digits, then GPT-2's regex.
        "smollm" => Ok(PreSequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into()),
        "llama-bpe" | "llama3" | "smaug-bpe" => split(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2),
        "gpt2" | "default" | "gpt-2" => Ok(ByteLevel::new(false, true, true).into()),
        other => {
            tracing::warn!(
                pre = other,
                "unknown tokenizer.ggml.pre; using GPT-2's pre-tokenizer"
            );
            Ok(ByteLevel::new(false, true, true).into())
        }
    }
}

/// SentencePiece BPE merges recovered from piece scores, as HF's converter does: every split of
/// a piece into two in-vocabulary pieces is a merge, ranked by the merged piece's score.
fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
    vocab: &AHashMap<String, u32>,
) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, u32, u32, &str, &str)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local = Vec::new();
        for (i, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(i);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((score, li, ri, l, r));
            }
        }
        local.sort_by_key(|m| (m.1, m.2));
        merges.extend(local);
    }
    // Higher score merges first; a stable sort keeps the per-piece order for ties.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}
