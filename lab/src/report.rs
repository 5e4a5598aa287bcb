//! From samples to figures per setting (`results.json`, `results.md`): fluency under the
//! judge, broken words, repetition, diversity across a prompt's samples, the critic's
//! verdicts, how much of the dream reached the text, time — and which settings are on the
//! fluency/diversity Pareto frontier.

use crate::embed::Embedder;
use crate::grid::Setting;
use crate::metrics;
use crate::run::Sample;
use serde::Serialize;
use std::collections::BTreeMap;

/// The figures of one setting.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub name: String,
    pub plain: bool,
    pub samples: usize,
    /// Mean judge NLL per token over non-empty replies (lower: more fluent).
    pub judge_nll: f64,
    /// Its standard error over replies.
    pub judge_nll_se: f64,
    /// Broken words over checked lowercase words, pooled.
    pub broken_word_rate: f64,
    /// Mean distinct-2 within a reply.
    pub distinct_2_within: f64,
    /// Replies with a line repeated more than twice.
    pub looping_replies: f64,
    /// Mean over prompts of distinct-2 over the pooled n-grams of its samples.
    pub distinct_2_across: f64,
    /// Mean over prompts of self-BLEU (lower: more varied).
    pub self_bleu: f64,
    /// Mean over prompts of the mean pairwise cosine distance of the samples' embeddings.
    pub embedding_distance: f64,
    /// Share of the chosen replies the majordomo accepted, asked to revise, rejected.
    pub accept_rate: f64,
    pub revise_rate: f64,
    pub reject_rate: f64,
    /// Replies the deterministic checks flagged.
    pub flagged_rate: f64,
    /// Replies that came from the plain last resort.
    pub plain_fallback_rate: f64,
    pub latent_steps_per_reply: f64,
    pub accepted_per_reply: f64,
    pub words_per_reply: f64,
    pub turn_ms: f64,
    pub empty_replies: usize,
    /// Not dominated in (judge NLL, distinct-2 across) by another setting.
    pub pareto: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub muse_model: String,
    pub majordomo_model: String,
    pub judge_model: String,
    pub prompts: usize,
    pub samples_per_prompt: usize,
    pub settings: Vec<Figures>,
}

fn mean(xs: impl IntoIterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.into_iter().collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Figures for every setting, in the grid's order.
pub fn figures(
    settings: &[Setting],
    samples: &[Sample],
    embedder: &Embedder,
) -> anyhow::Result<Vec<Figures>> {
    let mut out = Vec::new();
    for s in settings {
        let mine: Vec<&Sample> = samples.iter().filter(|x| x.setting == s.name).collect();
        if mine.is_empty() {
            continue;
        }
        let n = mine.len() as f64;
        let rate = |f: &dyn Fn(&Sample) -> bool| mine.iter().filter(|x| f(x)).count() as f64 / n;
        let nlls: Vec<f64> = mine
            .iter()
            .filter_map(|x| x.judge_nll.map(f64::from))
            .collect();
        let m = mean(nlls.iter().copied());
        let se = if nlls.len() > 1 {
            (nlls.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (nlls.len() - 1) as f64).sqrt()
                / (nlls.len() as f64).sqrt()
        } else {
            f64::NAN
        };
        let figs: Vec<metrics::ReplyFigures> = mine
            .iter()
            .map(|x| metrics::reply_figures(&x.reply))
            .collect();
        let checked: usize = figs.iter().map(|f| f.checked_words).sum();
        let broken: usize = figs.iter().map(|f| f.broken_words).sum();
        let mut by_prompt: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
        for x in &mine {
            by_prompt.entry(x.prompt_index).or_default().push(&x.reply);
        }
        let mut across = Vec::new();
        let mut bleu = Vec::new();
        let mut dist = Vec::new();
        for replies in by_prompt.values().filter(|r| r.len() > 1) {
            across.push(metrics::pooled_distinct_n(replies, 2) as f64);
            bleu.push(metrics::self_bleu(replies));
            let vecs = replies
                .iter()
                .map(|r| embedder.embed(r))
                .collect::<anyhow::Result<Vec<_>>>()?;
            dist.push(metrics::mean_pairwise_distance(&vecs));
        }
        out.push(Figures {
            name: s.name.clone(),
            plain: s.plain,
            samples: mine.len(),
            judge_nll: m,
            judge_nll_se: se,
            broken_word_rate: if checked == 0 {
                0.0
            } else {
                broken as f64 / checked as f64
            },
            distinct_2_within: mean(figs.iter().map(|f| f.distinct_2 as f64)),
            looping_replies: figs.iter().filter(|f| f.max_line_repeats > 2).count() as f64 / n,
            distinct_2_across: mean(across),
            self_bleu: mean(bleu),
            embedding_distance: mean(dist),
            accept_rate: rate(&|x| x.verdict == "accept"),
            revise_rate: rate(&|x| x.verdict == "revise"),
            reject_rate: rate(&|x| x.verdict == "reject"),
            flagged_rate: rate(&|x| !x.flags.is_empty()),
            plain_fallback_rate: rate(&|x| x.plain_fallback),
            latent_steps_per_reply: mean(mine.iter().map(|x| x.latent_steps as f64)),
            accepted_per_reply: mean(mine.iter().map(|x| x.accepted as f64)),
            words_per_reply: mean(figs.iter().map(|f| f.words as f64)),
            turn_ms: mean(mine.iter().map(|x| x.turn_ms)),
            empty_replies: mine.iter().filter(|x| x.reply.trim().is_empty()).count(),
            pareto: false,
        });
    }
    let points: Vec<(f64, f64)> = out
        .iter()
        .map(|f| (f.judge_nll, f.distinct_2_across))
        .collect();
    for (f, on) in out.iter_mut().zip(metrics::pareto(&points)) {
        f.pareto = on;
    }
    Ok(out)
}

/// The report as a markdown table (EVAL.md takes it as it is).
pub fn markdown(r: &Report) -> String {
    let mut s = format!(
        "muse `{}`, majordomo `{}`, judge `{}`; {} prompts × {} samples.\n\n",
        r.muse_model, r.majordomo_model, r.judge_model, r.prompts, r.samples_per_prompt
    );
    s.push_str("| setting | judge NLL ↓ | broken words ↓ | distinct-2 across ↑ | self-BLEU ↓ | embedding distance ↑ | distinct-2 within | looping | flagged | accept / revise / reject | latent steps (kept) | words | ms/turn | frontier |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for f in &r.settings {
        s.push_str(&format!(
            "| {}{} | {:.3} ± {:.3} | {:.2}% | {:.3} | {:.3} | {:.3} | {:.3} | {:.0}% | {:.0}% | {:.0} / {:.0} / {:.0}% | {:.1} ({:.1}) | {:.0} | {:.0} | {} |\n",
            f.name,
            if f.plain { " (plain)" } else { "" },
            f.judge_nll,
            f.judge_nll_se,
            100.0 * f.broken_word_rate,
            f.distinct_2_across,
            f.self_bleu,
            f.embedding_distance,
            f.distinct_2_within,
            100.0 * f.looping_replies,
            100.0 * f.flagged_rate,
            100.0 * f.accept_rate,
            100.0 * f.revise_rate,
            100.0 * f.reject_rate,
            f.latent_steps_per_reply,
            f.accepted_per_reply,
            f.words_per_reply,
            f.turn_ms,
            if f.pareto { "yes" } else { "" }
        ));
    }
    s
}
