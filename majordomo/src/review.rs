//! The majordomo's two jobs on a draft: a critique (model verdict, constrained to the schema,
//! merged with the deterministic checks) and a structure (title, points, summary).

use crate::checks::{self, DraftStats, Finding, LengthLimits};
use crate::constrained::{self, Constrainer, DecodeStats};
use crate::critique::{self, Critique, IssueKind, NoiseAdvice, Structure, Verdict};
use crate::error::{MajordomoError, Result};
use lm::Input;
use lm::{ChatMessage, LoadedModel};
use std::ops::Range;
use std::sync::Arc;

/// What the muse reported about the dream that made a draft, as the orchestrator summarises it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TelemetrySummary {
    pub bursts: u32,
    pub latent_steps: u32,
    pub mean_entropy: f32,
    /// Stop reasons of the bursts, e.g. "budget", "cold_stop", "norm_blowup".
    pub stop_reasons: Vec<String>,
}

impl TelemetrySummary {
    fn describe(&self) -> String {
        if self.bursts == 0 {
            return "none".into();
        }
        // Each reason once, with its count: the critic reads every token of this line.
        let mut stops: Vec<(&str, usize)> = Vec::new();
        for r in &self.stop_reasons {
            match stops.iter_mut().find(|(s, _)| s == r) {
                Some((_, n)) => *n += 1,
                None => stops.push((r, 1)),
            }
        }
        let stops: Vec<String> = stops
            .iter()
            .map(|(s, n)| {
                if *n == 1 {
                    s.to_string()
                } else {
                    format!("{s} x{n}")
                }
            })
            .collect();
        format!(
            "{} bursts, {} latent steps, mean entropy {:.2} nats, stops: {}",
            self.bursts,
            self.latent_steps,
            self.mean_entropy,
            stops.join(", ")
        )
    }
}

#[derive(Debug, Clone, Default)]
pub struct CritiqueRequest {
    /// What the user asked for.
    pub request: String,
    /// The latest turns of the conversation, oldest first.
    pub conversation: Vec<ChatMessage>,
    pub draft: String,
    pub telemetry: Option<TelemetrySummary>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CritiqueOutcome {
    /// The final critique: the model's, merged with the deterministic findings.
    pub critique: Critique,
    /// The model's own JSON, as decoded.
    pub model_json: String,
    /// What the deterministic checks found (their kinds), whatever the model said.
    pub findings: Vec<IssueKind>,
    pub stats: DraftStats,
    pub decode: DecodeStats,
    /// The draft's fluency under this model: its mean per-token NLL where the critique prompt
    /// gives it as the writer's reply to the conversation. Scored in the prompt's own forward,
    /// so it costs no pass of its own. None for an empty draft, and none from a remote critic
    /// (a chat-completions server cannot score our text).
    pub nll: Option<lm::Nll>,
}

impl CritiqueOutcome {
    /// The outcome of a critique whose model part is `model` (parsed and valid): merged with
    /// the checks' `findings`. Every backend ends here, so a remote critic's verdict is made
    /// stricter by the checks exactly as our own model's is.
    pub fn merged(
        model: Critique,
        model_json: String,
        stats: DraftStats,
        findings: &[Finding],
        decode: DecodeStats,
        nll: Option<lm::Nll>,
    ) -> Result<Self> {
        let critique = merge(model, findings);
        critique.validate().map_err(|e| {
            MajordomoError::Grammar(format!(
                "the merged critique is invalid ({e}): {critique:?}"
            ))
        })?;
        Ok(Self {
            critique,
            model_json,
            findings: findings.iter().map(|f| f.issue.kind).collect(),
            stats,
            decode,
            nll,
        })
    }
}

/// Request limits, checked at the API edge.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_request_chars: usize,
    pub max_draft_chars: usize,
    pub max_conversation_messages: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_request_chars: 4000,
            max_draft_chars: 100_000,
            max_conversation_messages: 64,
        }
    }
}

impl RequestLimits {
    /// Rejects oversized or empty-where-required fields of a critique request, naming the field.
    pub fn check(&self, r: &CritiqueRequest) -> Result<()> {
        let bad = |m: String| Err(MajordomoError::InvalidRequest(m));
        if r.request.trim().is_empty() {
            return bad("request is empty: say what the user asked for".into());
        }
        if r.request.chars().count() > self.max_request_chars {
            return bad(format!(
                "request is longer than {} characters",
                self.max_request_chars
            ));
        }
        self.check_draft_length(&r.draft)?;
        if r.conversation.len() > self.max_conversation_messages {
            return bad(format!(
                "conversation has more than {} messages",
                self.max_conversation_messages
            ));
        }
        Ok(())
    }

    /// Rejects a draft with nothing to structure, or too long a one.
    pub fn check_structure(&self, draft: &str) -> Result<()> {
        if draft.trim().is_empty() {
            return Err(MajordomoError::InvalidRequest(
                "draft is empty: nothing to structure".into(),
            ));
        }
        self.check_draft_length(draft)
    }

    fn check_draft_length(&self, draft: &str) -> Result<()> {
        if draft.chars().count() > self.max_draft_chars {
            return Err(MajordomoError::InvalidRequest(format!(
                "draft is longer than {} characters",
                self.max_draft_chars
            )));
        }
        Ok(())
    }
}

/// How much of a draft, and of each message of the conversation, the model reads (the checks
/// read all of the draft).
const DRAFT_HEAD_CHARS: usize = 1200;
const DRAFT_TAIL_CHARS: usize = 400;
/// The conversation the model reads: its latest messages within this many characters (as
/// windowed). The orchestrator sends the window its muse was primed with (3,000 characters by
/// default), so this bound only cuts conversations from other clients.
const CONVERSATION_CHARS: usize = 6000;
/// What follows the draft in a critique prompt; the draft is located by it for scoring.
const AFTER_DRAFT: &str = "\n\nDream telemetry: ";

const SYSTEM: &str =
    "You are the majordomo: a strict, sober editor. You judge drafts written by a \
creative writer for a user's request. Reply with JSON only.";

/// What a critique asks for. It sits in the system message, before anything that changes from
/// one critique to the next, so every critique prompt starts with the same tokens and the
/// prefix cache serves them.
const CRITIQUE_TASK: &str = "Critique the writer's last reply, the draft: verdict (accept, revise \
or reject), coherence and novelty from 0 to 10, issues, and advice for the next dream (noise \
lower, keep or raise; steps fewer, keep or more).";

/// What structuring asks for (in the system message, as above).
const STRUCTURE_TASK: &str =
    "Give the draft a short title, its key points, and a one-sentence summary.";

/// KV of recent prompts kept for later ones that start the same way: the instructions, and a
/// session's conversation (a critique prompt ends with the draft, which is the conversation's
/// next reply). A few dozen sessions' prompts for the default models.
const PREFIX_CACHE_BYTES: usize = 256 << 20;

/// Positions a prompt from the prefix cache leaves room for after itself: a critique's JSON
/// (about 35 tokens) without growing (copying) the cache again.
const OUTPUT_ROOM: usize = 64;

pub struct Majordomo {
    lm: Arc<LoadedModel>,
    constrainer: Constrainer,
    /// Prompts' KV, so the shared instructions are evaluated once, not per critique.
    prefixes: lm::PrefixCache,
    pub lengths: LengthLimits,
    pub limits: RequestLimits,
}

impl Majordomo {
    pub fn constrainer(&self) -> &Constrainer {
        &self.constrainer
    }

    pub fn new(lm: Arc<LoadedModel>) -> Result<Self> {
        let constrainer = Constrainer::new(&lm)?;
        Ok(Self {
            lm,
            constrainer,
            prefixes: lm::PrefixCache::new(PREFIX_CACHE_BYTES),
            lengths: LengthLimits::default(),
            limits: RequestLimits::default(),
        })
    }

    pub fn model(&self) -> &LoadedModel {
        &self.lm
    }

    /// Rejects oversized or empty-where-required fields, naming the field.
    pub fn validate(&self, r: &CritiqueRequest) -> Result<()> {
        self.limits.check(r)
    }

    /// A critique of the draft; `on_text` receives the model's JSON as it is written.
    pub fn critique(
        &self,
        r: &CritiqueRequest,
        on_text: impl FnMut(&str),
    ) -> Result<CritiqueOutcome> {
        self.validate(r)?;
        let (stats, findings) = checks::check(&r.request, &r.draft, self.lengths);
        let (prompt, draft) = self.critique_prompt(r)?;
        let schema = critique::model_schema();
        let (model_json, decode, nll) = self.run(
            &prompt,
            draft,
            &schema,
            critique::model_output_max_bytes(),
            on_text,
        )?;
        let model = Critique::parse(&model_json).map_err(|e| {
            MajordomoError::Grammar(format!(
                "constrained output did not parse ({e}): {model_json}"
            ))
        })?;
        CritiqueOutcome::merged(model, model_json, stats, &findings, decode, nll)
    }

    /// A draft's structure: title, points, summary.
    pub fn structure(
        &self,
        draft: &str,
        on_text: impl FnMut(&str),
    ) -> Result<(Structure, DecodeStats)> {
        self.limits.check_structure(draft)?;
        let prompt = self.lm.chat_prompt(&structure_messages(draft))?;
        let (json, decode, _) = self.run(
            &prompt,
            None,
            &critique::structure_schema(),
            critique::structure_output_max_bytes(),
            on_text,
        )?;
        let s = Structure::parse(&json).map_err(|e| {
            MajordomoError::Grammar(format!("constrained output did not parse ({e}): {json}"))
        })?;
        Ok((s, decode))
    }

    /// The token ids the model reads for a critique, and the range of the draft's tokens in
    /// them (none for an empty draft).
    pub fn critique_prompt(&self, r: &CritiqueRequest) -> Result<(Vec<u32>, Option<Range<usize>>)> {
        let messages = critique_messages(r);
        if r.draft.trim().is_empty() {
            return Ok((self.lm.chat_prompt(&messages)?, None));
        }
        let (prompt, span) =
            self.lm
                .chat_prompt_locating(&messages, &draft_as_read(&r.draft), AFTER_DRAFT)?;
        // The first draft token is predicted by the row before it.
        Ok((prompt, span.filter(|s| s.start > 0)))
    }

    /// Decodes the schema's JSON after `prompt`; with `score`, also the NLL of the prompt's
    /// tokens in that range, from the rows of the prompt's forward.
    fn run(
        &self,
        prompt: &[u32],
        score: Option<Range<usize>>,
        schema: &serde_json::Value,
        max_bytes: usize,
        on_text: impl FnMut(&str),
    ) -> Result<(String, DecodeStats, Option<lm::Nll>)> {
        if prompt.is_empty() {
            return Err(MajordomoError::InvalidRequest(
                "the prompt could not be rendered".into(),
            ));
        }
        self.lm
            .check_fits(prompt.len() + max_bytes.min(self.lm.model.max_context() / 2))?;
        let mut matcher = self.constrainer.matcher(schema)?;
        // The longest prefix an earlier prompt shares (at least the instructions), less the
        // last token, whose row gives the first logits, and less the scored tokens, whose
        // rows give their NLL.
        let keep = score.as_ref().map_or(prompt.len(), |s| s.start) - 1;
        let reusable = score.as_ref().map_or(prompt.len(), |s| s.end);
        let (mut cache, cached) = self
            .prefixes
            .checkout(prompt, keep, prompt.len() + OUTPUT_ROOM)?
            .unwrap_or_else(|| (self.lm.model.new_cache(), 0));
        let h = self
            .lm
            .model
            .forward(Input::Tokens(&prompt[cached..]), &mut cache)?;
        let logits = self.lm.model.last_logits(&h)?;
        let nll = match score {
            Some(s) => Some(lm::rows_nll(
                &self.lm,
                &h.narrow(0, s.start - 1 - cached, s.len())
                    .map_err(lm::LmError::from)?,
                &prompt[s],
            )?),
            None => None,
        };
        let budget = max_bytes.min(self.lm.model.max_context() - prompt.len());
        let (text, mut stats) = constrained::decode(
            &self.lm,
            &mut cache,
            logits,
            &mut matcher,
            budget,
            true,
            on_text,
        )?;
        if !matcher.is_accepting().unwrap_or(false) {
            return Err(MajordomoError::Grammar(format!(
                "output incomplete after {} tokens: {text}",
                stats.tokens
            )));
        }
        // The prompt's KV goes back by move, up to the end of the draft: the session's next
        // critique prompt extends exactly that (its conversation goes on with the draft as
        // the reply) and takes it whole; what follows the draft here does not recur.
        self.prefixes.insert(prompt[..reusable].to_vec(), cache);
        stats.prompt_tokens = prompt.len();
        stats.cached_prompt_tokens = cached;
        Ok((text, stats, nll))
    }
}

/// The model's critique, made stricter by the checks' findings: their issues come first, the
/// verdict is the strictest asked for, and dream advice follows the kind of finding.
pub fn merge(mut model: Critique, findings: &[checks::Finding]) -> Critique {
    let mut issues: Vec<critique::Issue> = findings.iter().map(|f| f.issue.clone()).collect();
    for i in model.issues.drain(..) {
        if !issues.iter().any(|f| f.kind == i.kind) && !i.detail.trim().is_empty() {
            issues.push(i);
        }
    }
    for f in findings {
        model.verdict = model.verdict.stricter(f.verdict);
        match f.issue.kind {
            // A looping dream is too cold; a drifting one too hot.
            IssueKind::Repetition => model.advice.noise = NoiseAdvice::Raise,
            IssueKind::LanguageSwitch | IssueKind::Drift => model.advice.noise = NoiseAdvice::Lower,
            IssueKind::Empty => {
                model.coherence = 0;
                model.novelty = 0;
            }
            _ => {}
        }
    }
    if model.verdict == Verdict::Accept && model.coherence < 3 {
        model.verdict = Verdict::Revise;
    }
    model.issues = issues;
    model
}

/// The messages a critic reads for a critique, whatever the backend: our model renders them
/// with its chat template, a remote server with its own.
///
/// The user message is the conversation as a transcript (the user's and the writer's turns,
/// each windowed alike), the request as the user's last turn and the draft as the writer's
/// reply to it, then the dream's telemetry. Since the draft is written as the next turn's
/// conversation will write the reply, the next critique's prompt starts with this one's, up
/// to the end of the draft, and the prefix cache serves all of it.
pub fn critique_messages(r: &CritiqueRequest) -> Vec<ChatMessage> {
    let mut used = 0;
    let mut turns: Vec<String> = r
        .conversation
        .iter()
        .rev()
        .map(|m| {
            let who = match m.role.as_str() {
                "user" => "User",
                "assistant" => "Writer",
                _ => "Context",
            };
            format!("{who}:\n{}", defuse(&window(&m.content)))
        })
        .take_while(|t| {
            used += t.chars().count();
            used <= CONVERSATION_CHARS
        })
        .collect();
    turns.reverse();
    turns.push(format!("User:\n{}", defuse(&window(&r.request))));
    let draft = if r.draft.trim().is_empty() {
        "(empty)".to_string()
    } else {
        draft_as_read(&r.draft)
    };
    turns.push(format!("Writer:\n{draft}"));
    let telemetry = r
        .telemetry
        .as_ref()
        .map_or_else(|| "none".to_string(), |t| defuse(&t.describe()));
    // User text is encoded as the template renders it; markers inside it stay text only if
    // the template escapes them, so the few that would end a turn early are neutralised.
    let user = format!("{}{AFTER_DRAFT}{telemetry}", turns.join("\n\n"));
    vec![
        ChatMessage::new("system", format!("{SYSTEM} {CRITIQUE_TASK}")),
        ChatMessage::user(user),
    ]
}

/// The draft as a critique prompt writes it.
fn draft_as_read(draft: &str) -> String {
    defuse(&window(draft))
}

/// The messages a critic reads to structure a draft.
pub fn structure_messages(draft: &str) -> Vec<ChatMessage> {
    let user = format!("Draft:\n{}", window(draft));
    vec![
        ChatMessage::new("system", format!("{SYSTEM} {STRUCTURE_TASK}")),
        ChatMessage::user(user),
    ]
}

/// The part of a long text the model reads: its head and tail, with the cut marked.
fn window(text: &str) -> String {
    let n = text.chars().count();
    if n <= DRAFT_HEAD_CHARS + DRAFT_TAIL_CHARS {
        return text.to_string();
    }
    let head: String = text.chars().take(DRAFT_HEAD_CHARS).collect();
    let tail: String = text.chars().skip(n - DRAFT_TAIL_CHARS).collect();
    format!(
        "{head}\n[... {} characters omitted ...]\n{tail}",
        n - DRAFT_HEAD_CHARS - DRAFT_TAIL_CHARS
    )
}

/// Chat markers inside user-provided text would end the turn early when the template is
/// rendered and parsed for special tokens: neutralise them.
fn defuse(text: &str) -> String {
    text.replace("<|", "<\u{200b}|")
        .replace("<start_of_turn>", "<\u{200b}start_of_turn>")
        .replace("<end_of_turn>", "<\u{200b}end_of_turn>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_names_each_stop_once_with_its_count() {
        let t = TelemetrySummary {
            bursts: 3,
            latent_steps: 9,
            mean_entropy: 2.0,
            stop_reasons: vec!["budget".into(), "cold_stop".into(), "budget".into()],
        };
        assert_eq!(
            t.describe(),
            "3 bursts, 9 latent steps, mean entropy 2.00 nats, stops: budget x2, cold_stop"
        );
    }

    #[test]
    fn a_draft_is_written_as_the_next_conversation_writes_the_reply() {
        let first = CritiqueRequest {
            request: "Rain, please.".into(),
            draft: "Rain <|im_end|> taps.".into(),
            ..Default::default()
        };
        let next = CritiqueRequest {
            request: "Snow now.".into(),
            conversation: vec![
                ChatMessage::user(first.request.clone()),
                ChatMessage::new("assistant", first.draft.clone()),
            ],
            draft: "Snow.".into(),
            ..Default::default()
        };
        let (a, b) = (&critique_messages(&first)[1], &critique_messages(&next)[1]);
        let through_draft = &a.content[..a.content.find(AFTER_DRAFT).unwrap()];
        assert!(b.content.starts_with(through_draft), "{a:?}\n{b:?}");
        assert!(!through_draft.contains("<|im_end|>"), "markers are defused");
    }
}
