//! Deterministic checks of a draft, run beside the model and merged into its verdict: they
//! catch what a small model misses (an earlier experiment rendered "Париж" as "ариж"; a dream
//! that skipped a token wrote "This ha of the sea's power"). The dream lab measures replies
//! with the same functions.

use crate::critique::{Issue, IssueKind, Verdict};
use std::collections::HashMap;

/// Figures the checks computed, reported with the critique.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DraftStats {
    pub chars: usize,
    pub words: usize,
    pub distinct_1: f32,
    pub distinct_2: f32,
    pub distinct_3: f32,
    /// Length (in words) of the longest word n-gram that occurs at least twice.
    pub longest_repeat: usize,
    /// Lowercase words that are no English word, over lowercase words (0 when there are none).
    pub broken_word_rate: f32,
    /// The lowercase words that are no English word, in order.
    pub broken_words: Vec<String>,
    /// Times the most repeated non-empty line occurs.
    pub max_line_repeats: usize,
    /// The share of the draft's letters in each script.
    pub scripts: Vec<(Script, f32)>,
}

/// A finding: an issue and the verdict it calls for at least.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub issue: Issue,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Script {
    Latin,
    Cyrillic,
    Greek,
    Arabic,
    Hebrew,
    Devanagari,
    Thai,
    Han,
    Kana,
    Hangul,
    Other,
}

/// The script of a letter (non-letters: None). Ranges of the Unicode blocks that matter here.
pub fn script_of(c: char) -> Option<Script> {
    if !c.is_alphabetic() {
        return None;
    }
    let u = c as u32;
    Some(match u {
        0x0041..=0x024F | 0x1E00..=0x1EFF | 0x2C60..=0x2C7F | 0xA720..=0xA7FF | 0xFF21..=0xFF5A => {
            Script::Latin
        }
        0x0370..=0x03FF | 0x1F00..=0x1FFF => Script::Greek,
        0x0400..=0x052F | 0x1C80..=0x1C8F | 0x2DE0..=0x2DFF | 0xA640..=0xA69F => Script::Cyrillic,
        0x0590..=0x05FF | 0xFB1D..=0xFB4F => Script::Hebrew,
        0x0600..=0x06FF | 0x0750..=0x077F | 0x08A0..=0x08FF | 0xFB50..=0xFDFF | 0xFE70..=0xFEFF => {
            Script::Arabic
        }
        0x0900..=0x097F => Script::Devanagari,
        0x0E00..=0x0E7F => Script::Thai,
        0x3040..=0x30FF | 0x31F0..=0x31FF | 0xFF66..=0xFF9F => Script::Kana,
        0xAC00..=0xD7AF | 0x1100..=0x11FF | 0x3130..=0x318F => Script::Hangul,
        0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2FA1F => Script::Han,
        _ => Script::Other,
    })
}

/// Shares of letters per script, largest first.
pub fn script_shares(text: &str) -> Vec<(Script, f32)> {
    let mut counts: HashMap<Script, usize> = HashMap::new();
    for s in text.chars().filter_map(script_of) {
        *counts.entry(s).or_default() += 1;
    }
    let total: usize = counts.values().sum();
    let mut v: Vec<(Script, f32)> = counts
        .into_iter()
        .map(|(s, n)| (s, n as f32 / total as f32))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// The text's words, lowercased (letters, digits and apostrophes).
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// distinct-n: unique n-grams over all n-grams (1.0 when there are none).
pub fn distinct_n(words: &[String], n: usize) -> f32 {
    if words.len() < n {
        return 1.0;
    }
    let grams: Vec<&[String]> = words.windows(n).collect();
    let unique: std::collections::HashSet<&[String]> = grams.iter().copied().collect();
    unique.len() as f32 / grams.len() as f32
}

/// The longest n (words) such that some n-gram occurs twice (non-overlapping not required).
pub fn longest_repeat(words: &[String]) -> usize {
    // Binary search on n: if an n-gram repeats, every shorter one does too.
    let repeats = |n: usize| {
        let mut seen = std::collections::HashSet::new();
        words.windows(n).any(|w| !seen.insert(w))
    };
    let (mut lo, mut hi) = (0usize, words.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if repeats(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// The English word list (Debian's `wamerican-large`, SCOWL; see `data/README.md`): lowercase
/// words, one a line, with contractions.
const WORD_LIST: &str = include_str!("../data/words.txt");

fn lexicon() -> &'static std::collections::HashSet<&'static str> {
    static LEXICON: std::sync::OnceLock<std::collections::HashSet<&'static str>> =
        std::sync::OnceLock::new();
    LEXICON.get_or_init(|| WORD_LIST.lines().collect())
}

/// Whether `word` (lowercase) is an English word: itself, or its stem before a possessive.
fn is_word(word: &str) -> bool {
    let lex = lexicon();
    lex.contains(word)
        || word
            .strip_suffix("'s")
            .or_else(|| word.strip_suffix('\''))
            .is_some_and(|stem| lex.contains(stem))
}

/// The words of `text` that are no English word, and how many words were checked. Only
/// all-lowercase words are checked: capitalised ones are names or sentence starts, which a
/// word list cannot judge. Hyphenated compounds are checked part by part; numbers are skipped.
/// What it catches: word pieces ("iku" for "haiku"), words fused across a skipped space
/// ("oneleather"), garbled tokens.
pub fn broken_words(text: &str) -> (Vec<String>, usize) {
    let normalised = text.replace(['’', '‘'], "'");
    let mut broken = Vec::new();
    let mut checked = 0;
    for token in normalised.split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '-')) {
        for part in token.split('-') {
            let part = part.trim_matches('\'');
            if part.is_empty()
                || !part.chars().all(|c| c.is_lowercase() || c == '\'')
                || part.chars().any(|c| c.is_ascii_digit())
            {
                continue;
            }
            checked += 1;
            if !is_word(part) {
                broken.push(part.to_string());
            }
        }
    }
    (broken, checked)
}

/// Times the most repeated non-empty line occurs (lines compared trimmed, lowercased).
pub fn max_line_repeats(text: &str) -> usize {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for line in text.lines().map(|l| l.trim().to_lowercase()) {
        if !line.is_empty() {
            *counts.entry(line).or_default() += 1;
        }
    }
    counts.values().copied().max().unwrap_or(0)
}

/// Chat-template markers and special tokens that must never reach a reader.
const LEAK_MARKERS: &[&str] = &[
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>",
    "<eos>",
    "</s>",
    "<s>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[INST]",
    "[/INST]",
    "<pad>",
    "<unk>",
];

/// Limits of a draft's length.
#[derive(Debug, Clone, Copy)]
pub struct LengthLimits {
    pub min_chars: usize,
    pub max_chars: usize,
}

impl Default for LengthLimits {
    fn default() -> Self {
        Self {
            min_chars: 12,
            max_chars: 8000,
        }
    }
}

/// A line may occur this often; more is a loop.
const MAX_LINE_REPEATS: usize = 2;
/// Broken words that flag a draft: two of them, or one in twenty checked words. One slip in a
/// long reply (a rare word the list lacks) does not.
const BROKEN_WORDS_FLAGGED: usize = 2;
const BROKEN_RATE_FLAGGED: f32 = 0.05;

/// At most `max` characters of `s` (findings never echo unbounded text).
fn clip(s: &str, max: usize) -> &str {
    s.char_indices().nth(max).map_or(s, |(i, _)| &s[..i])
}

/// Runs every check. `format_requested`: the request asked for a format (list, JSON, quotes),
/// so balanced brackets and quotes matter.
pub fn check(request: &str, draft: &str, limits: LengthLimits) -> (DraftStats, Vec<Finding>) {
    let w = words(draft);
    let (broken, checked) = broken_words(draft);
    let stats = DraftStats {
        chars: draft.chars().count(),
        words: w.len(),
        distinct_1: distinct_n(&w, 1),
        distinct_2: distinct_n(&w, 2),
        distinct_3: distinct_n(&w, 3),
        longest_repeat: longest_repeat(&w),
        broken_word_rate: if checked == 0 {
            0.0
        } else {
            broken.len() as f32 / checked as f32
        },
        broken_words: broken,
        max_line_repeats: max_line_repeats(draft),
        scripts: script_shares(draft),
    };
    let mut findings = Vec::new();
    let mut add = |kind, detail: String, verdict| {
        findings.push(Finding {
            issue: Issue { kind, detail },
            verdict,
        })
    };
    let trimmed = draft.trim();
    if trimmed.is_empty() {
        add(
            IssueKind::Empty,
            "the draft is empty".into(),
            Verdict::Reject,
        );
        return (stats, findings);
    }
    if stats.chars < limits.min_chars {
        add(
            IssueKind::Empty,
            format!("the draft is too short ({} characters)", stats.chars),
            Verdict::Revise,
        );
    }
    if stats.chars > limits.max_chars {
        add(
            IssueKind::Format,
            format!(
                "the draft is too long ({} characters, limit {})",
                stats.chars, limits.max_chars
            ),
            Verdict::Revise,
        );
    }
    if stats.words >= 12 && (stats.distinct_3 < 0.5 || stats.longest_repeat >= 8) {
        let verdict = if stats.distinct_3 < 0.2 {
            Verdict::Reject
        } else {
            Verdict::Revise
        };
        add(
            IssueKind::Repetition,
            format!(
                "repetitive: distinct-3 {:.2}, a {}-word run repeats",
                stats.distinct_3, stats.longest_repeat
            ),
            verdict,
        );
    }
    if stats.max_line_repeats > MAX_LINE_REPEATS {
        add(
            IssueKind::Repetition,
            format!("a line repeats {} times", stats.max_line_repeats),
            Verdict::Reject,
        );
    }
    if stats.broken_words.len() >= BROKEN_WORDS_FLAGGED
        || stats.broken_word_rate >= BROKEN_RATE_FLAGGED
    {
        let shown: Vec<&str> = stats
            .broken_words
            .iter()
            .take(3)
            .map(|w| clip(w, 24))
            .collect();
        add(
            IssueKind::BrokenWords,
            format!("no English word: {}", shown.join(", ")),
            Verdict::Revise,
        );
    }
    if let Some(detail) = script_switch(request, draft) {
        add(IssueKind::LanguageSwitch, detail, Verdict::Revise);
    }
    let leaked: Vec<&str> = LEAK_MARKERS
        .iter()
        .copied()
        .filter(|m| draft.contains(m))
        .collect();
    if !leaked.is_empty() {
        add(
            IssueKind::Format,
            format!("leaked template markers: {}", leaked.join(" ")),
            Verdict::Revise,
        );
    }
    if format_requested(request) {
        if let Some(detail) = unbalanced(draft) {
            add(IssueKind::Format, detail, Verdict::Revise);
        }
    }
    (stats, findings)
}

/// A switch of script against the request: the draft's letters are mostly in a script the
/// request does not use, or a word mixes scripts (the "ариж" kind of drift).
fn script_switch(request: &str, draft: &str) -> Option<String> {
    let req = script_shares(request);
    let dra = script_shares(draft);
    let main = |v: &[(Script, f32)]| v.first().map(|(s, _)| *s);
    if let (Some(r), Some(d)) = (main(&req), main(&dra)) {
        if r != d && r != Script::Other && d != Script::Other {
            let share = dra[0].1;
            return Some(format!(
                "the request is in {r:?} script but {:.0}% of the draft is {d:?}",
                share * 100.0
            ));
        }
        // A notable share of a script the request never used.
        if let Some((s, share)) = dra.iter().find(|(s, share)| {
            *share >= 0.15 && *s != Script::Other && !req.iter().any(|(q, _)| q == s)
        }) {
            return Some(format!(
                "{:.0}% of the draft's letters switch to {s:?} script",
                share * 100.0
            ));
        }
    }
    let mixed: Vec<&str> = draft
        .split_whitespace()
        .filter(|w| {
            let mut scripts: Vec<Script> = w
                .chars()
                .filter_map(script_of)
                .filter(|s| *s != Script::Other)
                .collect();
            scripts.dedup();
            scripts.sort();
            scripts.dedup();
            scripts.len() > 1
        })
        .take(3)
        .collect();
    (!mixed.is_empty()).then(|| format!("words mix scripts: {}", mixed.join(", ")))
}

fn format_requested(request: &str) -> bool {
    let r = request.to_lowercase();
    [
        "json", "list", "quote", "bullet", "table", "format", "brackets", "code",
    ]
    .iter()
    .any(|k| r.contains(k))
}

fn unbalanced(draft: &str) -> Option<String> {
    let mut stack = Vec::new();
    for c in draft.chars() {
        match c {
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if stack.pop() != Some(open) {
                    return Some(format!("unbalanced `{c}`"));
                }
            }
            _ => {}
        }
    }
    if let Some(c) = stack.pop() {
        return Some(format!("unclosed `{c}`"));
    }
    if draft.matches('"').count() % 2 == 1 {
        return Some("an odd number of double quotes".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_is_measured_and_flagged() {
        let rep = "the sea is blue and ".repeat(30);
        let (stats, f) = check("Write about the sea", &rep, LengthLimits::default());
        assert!(
            stats.distinct_3 < 0.1 && stats.longest_repeat > 50,
            "{stats:?}"
        );
        assert!(f
            .iter()
            .any(|f| f.issue.kind == IssueKind::Repetition && f.verdict == Verdict::Reject));
        let prose = "Waves fold over the pier while gulls argue about bread. Later the tide turns, and the harbour lights come on one by one.";
        let (_, f) = check("Write about the sea", prose, LengthLimits::default());
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn broken_and_fused_words_are_found_and_names_are_spared() {
        let (broken, checked) =
            broken_words("This ha of the sea's power: oneleather is a lighthouse keeper's iku.");
        assert_eq!(broken, ["oneleather", "iku"]);
        assert_eq!(checked, 11, "'This' is capitalised and not checked");
        let (broken, _) = broken_words("Elara didn't see the well-known dream-like tide at 5pm.");
        assert!(broken.is_empty(), "{broken:?}");
        let (_, f) = check(
            "Write a haiku about the sea.",
            "This ha of the sea, iku waves oneleather and foam",
            LengthLimits::default(),
        );
        assert!(
            f.iter().any(|f| f.issue.kind == IssueKind::BrokenWords),
            "{f:?}"
        );
    }

    #[test]
    fn a_line_repeated_more_than_twice_is_a_loop() {
        let looping = "The lassi,\nThe lassi,\nLighthouse keeper,\nThe lassi,";
        assert_eq!(max_line_repeats(looping), 3);
        let (_, f) = check("Tell a story", looping, LengthLimits::default());
        assert!(f
            .iter()
            .any(|f| f.issue.kind == IssueKind::Repetition && f.verdict == Verdict::Reject));
        assert_eq!(max_line_repeats("a\nb\na"), 2);
        assert_eq!(max_line_repeats(""), 0);
    }

    #[test]
    fn script_switches_are_caught() {
        let (_, f) = check(
            "What is the capital of France?",
            "The capital is Париж, a city on the Seine.",
            LengthLimits::default(),
        );
        assert!(
            f.iter().any(|f| f.issue.kind == IssueKind::LanguageSwitch),
            "{f:?}"
        );
        let (_, f) = check(
            "Столица Франции?",
            "Столица Франции — пaриж.",
            LengthLimits::default(),
        ); // a Latin 'a' inside
        assert!(
            f.iter().any(
                |f| f.issue.kind == IssueKind::LanguageSwitch && f.issue.detail.contains("mix")
            ),
            "{f:?}"
        );
        let (_, f) = check(
            "Столица Франции?",
            "Столица Франции — Париж.",
            LengthLimits::default(),
        );
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn empty_short_long_leaks_and_brackets() {
        let lim = LengthLimits::default();
        assert_eq!(check("x", "   ", lim).1[0].verdict, Verdict::Reject);
        assert!(check("x", "ok", lim)
            .1
            .iter()
            .any(|f| f.issue.kind == IssueKind::Empty));
        assert!(check("x", &"word ".repeat(3000), lim)
            .1
            .iter()
            .any(|f| f.issue.detail.contains("too long")));
        assert!(check("x", "Sure!<|im_end|> more text here", lim)
            .1
            .iter()
            .any(|f| f.issue.detail.contains("<|im_end|>")));
        assert!(check("Answer in JSON", "{\"a\": [1, 2}", lim)
            .1
            .iter()
            .any(|f| f.issue.kind == IssueKind::Format));
        assert!(check("Tell a story", "{\"a\": [1, 2}", lim)
            .1
            .iter()
            .all(|f| f.issue.kind != IssueKind::Format));
    }
}
