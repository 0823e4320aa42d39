//! `summary`: the sentences that say most of what a text says.

use std::collections::{HashMap, HashSet};

use super::text::{normalize, words};

/// Sentences shorter than this (in words) are chosen only when too few longer ones exist:
/// headings and fragments summarize badly.
const MIN_WORDS: usize = 5;
/// Sentences looked at: the graph has one edge per pair.
const MAX_SENTENCES: usize = 500;
/// PageRank's damping factor, and when its iteration stops.
const DAMPING: f64 = 0.85;
const ITERATIONS: usize = 100;
const CONVERGED: f64 = 1e-6;

/// An extractive summary of `sentences`: `n` of them, in the text's order, joined by a space.
///
/// TextRank (Mihalcea & Tarau, 2004): sentences are the nodes of a graph whose edges weigh how
/// much two sentences share — the content words (not stop words of the language, `stop`;
/// with a letter) they have in common, over the sum of the logarithms of their lengths — and
/// PageRank over that graph ranks them. The `n` best are kept (the earlier of equals). A
/// sentence that shares nothing with the rest (an aside) ranks last, one that shares with
/// many ranks first. A text of `n` sentences or fewer is its own summary; of a longer one the
/// first 500 sentences are looked at.
pub fn summarize(sentences: &[&str], stop: Option<&HashSet<&'static str>>, n: usize) -> String {
    if sentences.len() <= n {
        return sentences.join(" ");
    }
    let sentences = &sentences[..sentences.len().min(MAX_SENTENCES)];
    let rank = rank(sentences, stop);
    let long: Vec<usize> = (0..sentences.len())
        .filter(|&i| words(sentences[i]).count() >= MIN_WORDS)
        .collect();
    let mut chosen = if long.len() >= n {
        long
    } else {
        (0..sentences.len()).collect()
    };
    // Best first; a stable sort keeps the earlier of equals first.
    chosen.sort_by(|&a, &b| rank[b].total_cmp(&rank[a]));
    chosen.truncate(n);
    chosen.sort_unstable();
    chosen
        .into_iter()
        .map(|i| sentences[i])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Each sentence's TextRank score.
fn rank(sentences: &[&str], stop: Option<&HashSet<&'static str>>) -> Vec<f64> {
    let sets: Vec<HashSet<String>> = sentences
        .iter()
        .map(|s| {
            words(s)
                .map(normalize)
                .filter(|w| w.chars().any(char::is_alphabetic))
                .filter(|w| !stop.is_some_and(|st| st.contains(w.as_str())))
                .collect()
        })
        .collect();
    let len = sets.len();
    // Shared words per pair, through an index of the sentences each word is in.
    let mut index: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, set) in sets.iter().enumerate() {
        for w in set {
            index.entry(w).or_default().push(i);
        }
    }
    let mut shared: HashMap<(usize, usize), f64> = HashMap::new();
    for list in index.values() {
        for (k, &i) in list.iter().enumerate() {
            for &j in &list[k + 1..] {
                *shared.entry((i, j)).or_default() += 1.0;
            }
        }
    }
    let mut edges: Vec<Vec<(usize, f64)>> = vec![Vec::new(); len];
    for ((i, j), common) in shared {
        let norm = (sets[i].len() as f64).ln() + (sets[j].len() as f64).ln();
        let w = common / norm.max(1.0);
        edges[i].push((j, w));
        edges[j].push((i, w));
    }
    let out: Vec<f64> = edges
        .iter()
        .map(|e| e.iter().map(|(_, w)| w).sum())
        .collect();
    let mut score = vec![1.0; len];
    for _ in 0..ITERATIONS {
        let next: Vec<f64> = (0..len)
            .map(|i| {
                let incoming: f64 = edges[i].iter().map(|&(j, w)| w / out[j] * score[j]).sum();
                (1.0 - DAMPING) + DAMPING * incoming
            })
            .collect();
        let delta = next
            .iter()
            .zip(&score)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        score = next;
        if delta < CONVERGED {
            break;
        }
    }
    score
}

#[cfg(test)]
mod tests {
    use super::super::text::{sentences, stop_words};
    use super::*;

    #[test]
    fn the_central_sentences_are_chosen_and_keep_their_order() {
        let text = "Bees pollinate many crops that people eat. \
            My neighbour painted his fence blue last Sunday afternoon. \
            Without bees, farmers would lose a large part of their crops. \
            The weather was pleasant for most of the week. \
            Protecting bees therefore protects the crops and the farmers who grow them.";
        let s = sentences(text);
        let summary = summarize(&s, stop_words(whatlang::Lang::Eng), 2);
        assert_eq!(
            summary,
            "Without bees, farmers would lose a large part of their crops. Protecting bees \
             therefore protects the crops and the farmers who grow them."
        );
        assert_eq!(summarize(&s, None, 10), s.join(" "));
        assert_eq!(summarize(&[], None, 3), "");
    }

    #[test]
    fn other_languages_are_summarized_with_their_stop_words() {
        let text = "Le chat dort sur le canapé du salon. \
            Il fait beau aujourd'hui à Paris et les gens se promènent. \
            Le chat du voisin vient souvent dormir sur notre canapé. \
            Les enfants préparent un gâteau au chocolat pour ce soir.";
        let s = sentences(text);
        let summary = summarize(&s, stop_words(whatlang::Lang::Fra), 1);
        assert!(
            summary.contains("chat") && summary.contains("canapé"),
            "{summary}"
        );
    }

    #[test]
    fn asides_rank_last() {
        let s = [
            "Bees pollinate crops.",
            "The weather was nice.",
            "Farmers need bees for crops.",
        ];
        let r = rank(&s, stop_words(whatlang::Lang::Eng));
        assert!(r[1] < r[0] && r[1] < r[2], "{r:?}");
        assert_eq!(r[1], 1.0 - DAMPING);
    }

    #[test]
    fn short_fragments_yield_to_sentences() {
        let text = "Bees.\nBees are important for crops and for farmers everywhere.\nCrops.\n\
                    Farmers depend on bees for many of their crops each year.";
        let s = sentences(text);
        let summary = summarize(&s, stop_words(whatlang::Lang::Eng), 2);
        assert!(
            !summary.starts_with("Bees. ") && !summary.contains("Crops."),
            "{summary}"
        );
    }
}
