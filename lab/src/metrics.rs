//! What the lab measures in replies: broken words, repetition within a reply, and diversity
//! across the samples of one prompt (distinct-n over their pooled n-grams, self-BLEU, and the
//! mean pairwise cosine distance of sentence embeddings). Word-level figures use the
//! majordomo's deterministic checks, so the lab and the critic read words the same way.

use majordomo::checks;
use std::collections::HashMap;

/// Figures of one reply on its own.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReplyFigures {
    pub words: usize,
    /// Lowercase words checked against the word list, and those that are no word.
    pub checked_words: usize,
    pub broken_words: usize,
    /// distinct-2 within the reply.
    pub distinct_2: f32,
    /// Times its most repeated line occurs.
    pub max_line_repeats: usize,
}

pub fn reply_figures(text: &str) -> ReplyFigures {
    let w = checks::words(text);
    let (broken, checked) = checks::broken_words(text);
    ReplyFigures {
        words: w.len(),
        checked_words: checked,
        broken_words: broken.len(),
        distinct_2: checks::distinct_n(&w, 2),
        max_line_repeats: checks::max_line_repeats(text),
    }
}

/// distinct-n over the pooled n-grams of several texts: unique n-grams over all n-grams
/// (1 when there are none). Identical samples score low, disjoint ones 1.
pub fn pooled_distinct_n(texts: &[&str], n: usize) -> f32 {
    let mut all = 0usize;
    let mut unique = std::collections::HashSet::new();
    for t in texts {
        let w = checks::words(t);
        for g in w.windows(n) {
            all += 1;
            unique.insert(g.to_vec());
        }
    }
    if all == 0 {
        1.0
    } else {
        unique.len() as f32 / all as f32
    }
}

/// BLEU-4 of `hypothesis` against `references` (clipped n-gram precision, geometric mean
/// with +1 smoothing for n > 1, brevity penalty by the closest reference length).
pub fn bleu(hypothesis: &[String], references: &[Vec<String>]) -> f64 {
    if hypothesis.is_empty() || references.is_empty() {
        return 0.0;
    }
    let mut log_sum = 0.0;
    for n in 1..=4usize {
        let counts = ngram_counts(hypothesis, n);
        let total: usize = counts.values().sum();
        let mut max_ref: HashMap<&[String], usize> = HashMap::new();
        for r in references {
            for (g, c) in ngram_counts(r, n) {
                let e = max_ref.entry(g).or_default();
                *e = (*e).max(c);
            }
        }
        let clipped: usize = counts
            .iter()
            .map(|(g, &c)| c.min(max_ref.get(g).copied().unwrap_or(0)))
            .sum();
        let (num, den) = if n == 1 {
            (clipped as f64, total as f64)
        } else {
            (clipped as f64 + 1.0, total as f64 + 1.0)
        };
        if num == 0.0 || den == 0.0 {
            return 0.0;
        }
        log_sum += (num / den).ln() / 4.0;
    }
    let h = hypothesis.len() as f64;
    let r = references
        .iter()
        .map(|r| r.len() as f64)
        .min_by(|a, b| (a - h).abs().total_cmp(&(b - h).abs()))
        .unwrap_or(h);
    let bp = if h >= r { 1.0 } else { (1.0 - r / h).exp() };
    bp * log_sum.exp()
}

fn ngram_counts(w: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut m = HashMap::new();
    for g in w.windows(n) {
        *m.entry(g).or_default() += 1;
    }
    m
}

/// Mean BLEU-4 of each sample against the others (higher: the samples say the same thing).
pub fn self_bleu(texts: &[&str]) -> f64 {
    if texts.len() < 2 {
        return 0.0;
    }
    let words: Vec<Vec<String>> = texts.iter().map(|t| checks::words(t)).collect();
    let scores: Vec<f64> = (0..words.len())
        .map(|i| {
            let others: Vec<Vec<String>> = words
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, w)| w.clone())
                .collect();
            bleu(&words[i], &others)
        })
        .collect();
    scores.iter().sum::<f64>() / scores.len() as f64
}

/// Mean pairwise cosine distance of unit vectors (0: all the same direction).
pub fn mean_pairwise_distance(vectors: &[Vec<f32>]) -> f64 {
    let mut sum = 0.0;
    let mut n = 0usize;
    for i in 0..vectors.len() {
        for j in i + 1..vectors.len() {
            let dot: f32 = vectors[i].iter().zip(&vectors[j]).map(|(a, b)| a * b).sum();
            sum += 1.0 - dot as f64;
            n += 1;
        }
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// The settings not dominated by another: lower NLL and higher diversity are both better.
/// `points`: (nll, diversity) per setting; returns whether each is on the frontier.
pub fn pareto(points: &[(f64, f64)]) -> Vec<bool> {
    points
        .iter()
        .map(|&(nll, div)| {
            !points
                .iter()
                .any(|&(n2, d2)| n2 <= nll && d2 >= div && (n2 < nll || d2 > div))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_line_and_a_broken_word_are_counted() {
        let f = reply_figures("The lassi,\nThe lassi,\nLighthouse keeper,\nThe lassi,");
        assert_eq!(f.max_line_repeats, 3);
        assert!(f.distinct_2 < 0.75, "{f:?}");
        let f = reply_figures("This ha of the sea's power is iku.");
        assert_eq!((f.broken_words, f.checked_words), (1, 7));
        let clean = reply_figures("Waves fold over the pier while gulls argue about bread.");
        assert_eq!((clean.broken_words, clean.max_line_repeats), (0, 1));
        assert_eq!(clean.distinct_2, 1.0);
    }

    #[test]
    fn identical_samples_are_not_diverse_and_disjoint_ones_are() {
        let same = ["the sea is calm tonight", "the sea is calm tonight"];
        let apart = [
            "the sea is calm tonight",
            "bright lanterns swing over docks",
        ];
        assert!((pooled_distinct_n(&same, 2) - 0.5).abs() < 1e-6);
        assert_eq!(pooled_distinct_n(&apart, 2), 1.0);
        assert!((self_bleu(&same) - 1.0).abs() < 1e-9);
        assert_eq!(self_bleu(&apart), 0.0);
        let v = vec![vec![1.0, 0.0], vec![1.0, 0.0], vec![0.0, 1.0]];
        assert!((mean_pairwise_distance(&v[..2])).abs() < 1e-9);
        assert!((mean_pairwise_distance(&v) - 2.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn the_frontier_keeps_the_undominated() {
        // (nll, diversity): the second dominates the third; the first and second trade off.
        let on = pareto(&[(2.0, 0.5), (3.0, 0.9), (3.5, 0.8)]);
        assert_eq!(on, [true, true, false]);
    }
}
