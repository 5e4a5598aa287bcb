//! Deterministic checks of a draft, run beside the model and merged into its verdict: they
//! catch what a small model misses (an earlier experiment rendered "Париж" as "ариж").

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

fn words(text: &str) -> Vec<String> {
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

/// Runs every check. `format_requested`: the request asked for a format (list, JSON, quotes),
/// so balanced brackets and quotes matter.
pub fn check(request: &str, draft: &str, limits: LengthLimits) -> (DraftStats, Vec<Finding>) {
    let w = words(draft);
    let stats = DraftStats {
        chars: draft.chars().count(),
        words: w.len(),
        distinct_1: distinct_n(&w, 1),
        distinct_2: distinct_n(&w, 2),
        distinct_3: distinct_n(&w, 3),
        longest_repeat: longest_repeat(&w),
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
