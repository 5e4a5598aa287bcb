//! The critique: its JSON schema (what constrained decoding enforces), its Rust type (what
//! software acts on), and validation of the final, merged object.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Accept,
    Revise,
    Reject,
}

impl Verdict {
    /// Severity order: a finding can only make a verdict stricter.
    fn rank(self) -> u8 {
        match self {
            Self::Accept => 0,
            Self::Revise => 1,
            Self::Reject => 2,
        }
    }

    pub fn stricter(self, other: Self) -> Self {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueKind {
    Contradiction,
    Drift,
    Repetition,
    OffTopic,
    LanguageSwitch,
    Format,
    Empty,
    BrokenWords,
}

impl IssueKind {
    pub const ALL: [IssueKind; 8] = [
        Self::Contradiction,
        Self::Drift,
        Self::Repetition,
        Self::OffTopic,
        Self::LanguageSwitch,
        Self::Format,
        Self::Empty,
        Self::BrokenWords,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Contradiction => "contradiction",
            Self::Drift => "drift",
            Self::Repetition => "repetition",
            Self::OffTopic => "off_topic",
            Self::LanguageSwitch => "language_switch",
            Self::Format => "format",
            Self::Empty => "empty",
            Self::BrokenWords => "broken_words",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Issue {
    pub kind: IssueKind,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseAdvice {
    Lower,
    Keep,
    Raise,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepsAdvice {
    Fewer,
    Keep,
    More,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Advice {
    pub noise: NoiseAdvice,
    pub steps: StepsAdvice,
}

/// A critique of one draft: a judgment, not a summary (the structure job writes those). Field
/// order is the schema's (and the JSON's). Every free-text token is sampled one forward at a
/// time, so the critique holds only what the pipeline acts on: a summary and key points here
/// tripled the sampled tokens, and a small critic filled them by copying the draft.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Critique {
    pub verdict: Verdict,
    pub coherence: u8,
    pub novelty: u8,
    pub issues: Vec<Issue>,
    pub advice: Advice,
}

/// Bounds on what the model may write: with them (and compact JSON), every critique fits in
/// a known number of bytes, so decoding always ends inside its token budget.
pub const SUMMARY_MAX: usize = 120;
pub const DETAIL_MAX: usize = 80;
pub const POINT_MAX: usize = 60;
pub const MODEL_ISSUES_MAX: usize = 3;

/// The JSON schema constrained decoding enforces on the model's output.
pub fn model_schema() -> serde_json::Value {
    let kinds: Vec<&str> = IssueKind::ALL.iter().map(|k| k.as_str()).collect();
    serde_json::json!({
        "x-guidance": { "whitespace_flexible": false, "item_separator": ",", "key_separator": ":" },
        "type": "object",
        "properties": {
            "verdict": { "enum": ["accept", "revise", "reject"] },
            "coherence": { "type": "integer", "minimum": 0, "maximum": 10 },
            "novelty": { "type": "integer", "minimum": 0, "maximum": 10 },
            "issues": {
                "type": "array", "maxItems": MODEL_ISSUES_MAX,
                "items": {
                    "type": "object",
                    "properties": {
                        "kind": { "enum": kinds },
                        "detail": { "type": "string", "maxLength": DETAIL_MAX }
                    },
                    "required": ["kind", "detail"], "additionalProperties": false
                }
            },
            "advice": {
                "type": "object",
                "properties": {
                    "noise": { "enum": ["lower", "keep", "raise"] },
                    "steps": { "enum": ["fewer", "keep", "more"] }
                },
                "required": ["noise", "steps"], "additionalProperties": false
            }
        },
        "required": ["verdict", "coherence", "novelty", "issues", "advice"],
        "additionalProperties": false
    })
}

/// Most bytes a schema-valid model output can take (strings may escape to 6 bytes a char).
pub fn model_output_max_bytes() -> usize {
    let skeleton = 200; // keys, punctuation, enums, numbers
    skeleton + 6 * MODEL_ISSUES_MAX * (DETAIL_MAX + 40)
}

impl Critique {
    /// Checks what the types cannot: score ranges and non-empty text where it matters.
    pub fn validate(&self) -> Result<(), String> {
        if self.coherence > 10 || self.novelty > 10 {
            return Err(format!(
                "scores must be 0-10, got coherence {} novelty {}",
                self.coherence, self.novelty
            ));
        }
        if self.issues.iter().any(|i| i.detail.trim().is_empty()) {
            return Err("an issue has an empty detail".into());
        }
        Ok(())
    }

    /// Parses and validates a critique's JSON.
    pub fn parse(json: &str) -> Result<Self, String> {
        let c: Critique = serde_json::from_str(json).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }
}

/// The structure of a draft: a title, its points, a summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Structure {
    pub title: String,
    pub points: Vec<String>,
    pub summary: String,
}

impl Structure {
    /// Parses a structure's JSON; the title must not be empty (the schema's `minLength`, which
    /// a remote server's grammar may not enforce).
    pub fn parse(json: &str) -> Result<Self, String> {
        let s: Structure = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if s.title.is_empty() {
            return Err("the title is empty".into());
        }
        Ok(s)
    }
}

pub const TITLE_MAX: usize = 60;
pub const STRUCTURE_POINTS_MAX: usize = 5;

pub fn structure_schema() -> serde_json::Value {
    serde_json::json!({
        "x-guidance": { "whitespace_flexible": false, "item_separator": ",", "key_separator": ":" },
        "type": "object",
        "properties": {
            "title": { "type": "string", "minLength": 1, "maxLength": TITLE_MAX },
            "points": { "type": "array", "maxItems": STRUCTURE_POINTS_MAX, "items": { "type": "string", "maxLength": POINT_MAX } },
            "summary": { "type": "string", "maxLength": SUMMARY_MAX }
        },
        "required": ["title", "points", "summary"],
        "additionalProperties": false
    })
}

pub fn structure_output_max_bytes() -> usize {
    100 + 6 * (TITLE_MAX + STRUCTURE_POINTS_MAX * (POINT_MAX + 4) + SUMMARY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_and_rejects_invalid() {
        let ok = r#"{"verdict":"revise","coherence":7,"novelty":3,"issues":[{"kind":"repetition","detail":"loops"}],"advice":{"noise":"lower","steps":"keep"}}"#;
        let c = Critique::parse(ok).unwrap();
        assert_eq!(c.verdict, Verdict::Revise);
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            ok,
            "field order must follow the schema"
        );
        for bad in [
            ok.replace("\"revise\"", "\"maybe\""),
            ok.replace("7", "11"),
            ok.replace("repetition", "typo"),
            ok.replace("}}", "},\"extra\":1}"),
            ok[..40].to_string(),
        ] {
            assert!(Critique::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn verdicts_only_get_stricter() {
        assert_eq!(Verdict::Accept.stricter(Verdict::Revise), Verdict::Revise);
        assert_eq!(Verdict::Reject.stricter(Verdict::Revise), Verdict::Reject);
    }
}
