//! `keywords`: the phrases a text is about.

use std::collections::{HashMap, HashSet};

use capibara_shared::domain::content::Keyword;
use unicode_segmentation::UnicodeSegmentation;

use super::text::normalize;

/// Longest phrase kept, in words.
const MAX_PHRASE_WORDS: usize = 4;

/// The `max` best key phrases of `text`, best first.
///
/// With a stop-word list (`stop`, the language's): RAKE, Rapid Automatic Keyword Extraction
/// (Rose et al., 2010). The text is cut into candidate phrases at stop words, punctuation and
/// line breaks; each word scores its degree (the lengths of the phrases it is in, summed) over
/// its frequency; a phrase scores the sum of its words' scores. Phrases of more than four
/// words, numbers and one-letter words are left out; a phrase that recurs is scored once.
///
/// Without one (a language neither stop list covers): the most frequent words of two letters
/// or more, scored by their share of all words. Scripts written without spaces (Chinese,
/// Japanese, Thai) are not cut into words, so they get no useful keywords.
pub fn keywords(text: &str, stop: Option<&HashSet<&'static str>>, max: usize) -> Vec<Keyword> {
    match stop {
        Some(stop) => rake(text, stop, max),
        None => frequent(text, max),
    }
}

/// Whether a word may be part of a key phrase.
fn keyable(word: &str) -> bool {
    word.chars().any(char::is_alphabetic) && word.chars().nth(1).is_some()
}

fn rake(text: &str, stop: &HashSet<&'static str>, max: usize) -> Vec<Keyword> {
    let mut phrases: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut end = |current: &mut Vec<String>| {
        if !current.is_empty() {
            phrases.push(std::mem::take(current));
        }
    };
    for piece in text.split_word_bounds() {
        if piece.chars().any(char::is_alphanumeric) {
            let word = normalize(piece);
            if stop.contains(word.as_str()) || !keyable(&word) {
                end(&mut current);
            } else {
                current.push(word);
            }
        } else if !piece.chars().all(char::is_whitespace) || piece.contains('\n') {
            end(&mut current);
        }
    }
    end(&mut current);
    phrases.retain(|p| p.len() <= MAX_PHRASE_WORDS);
    let mut frequency: HashMap<&str, f64> = HashMap::new();
    let mut degree: HashMap<&str, f64> = HashMap::new();
    for p in &phrases {
        for w in p {
            *frequency.entry(w).or_default() += 1.0;
            *degree.entry(w).or_default() += p.len() as f64;
        }
    }
    let mut seen = HashSet::new();
    let mut scored: Vec<Keyword> = phrases
        .iter()
        .filter(|p| seen.insert(p.join(" ")))
        .map(|p| Keyword {
            term: p.join(" "),
            score: p
                .iter()
                .map(|w| degree[w.as_str()] / frequency[w.as_str()])
                .sum(),
        })
        .collect();
    best(&mut scored, max);
    scored
}

fn frequent(text: &str, max: usize) -> Vec<Keyword> {
    let mut counts: HashMap<String, (usize, usize)> = HashMap::new();
    let mut total = 0usize;
    for (i, w) in text.unicode_words().enumerate() {
        total += 1;
        let w = normalize(w);
        if keyable(&w) {
            counts.entry(w).or_insert((0, i)).0 += 1;
        }
    }
    let mut by_first: Vec<(String, (usize, usize))> = counts.into_iter().collect();
    by_first.sort_by_key(|(_, (_, first))| *first);
    let mut scored: Vec<Keyword> = by_first
        .into_iter()
        .map(|(term, (n, _))| Keyword {
            term,
            score: n as f64 / total as f64,
        })
        .collect();
    best(&mut scored, max);
    scored
}

/// The `max` best, highest score first (the earlier in the text on a tie), scores rounded.
fn best(scored: &mut Vec<Keyword>, max: usize) {
    scored.sort_by(|a, b| b.score.total_cmp(&a.score));
    scored.truncate(max);
    for k in scored {
        k.score = super::round(k.score, 3);
    }
}

#[cfg(test)]
mod tests {
    use super::super::text::stop_words;
    use super::*;

    fn terms(text: &str, lang: whatlang::Lang, max: usize) -> Vec<String> {
        keywords(text, stop_words(lang), max)
            .into_iter()
            .map(|k| k.term)
            .collect()
    }

    const EN: &str = "Compatibility of systems of linear constraints over the set of natural \
        numbers. Criteria of compatibility of a system of linear Diophantine equations, strict \
        inequations, and nonstrict inequations are considered. Upper bounds for components of \
        a minimal set of solutions and algorithms of construction of minimal generating sets \
        of solutions for all types of systems are given.";

    #[test]
    fn rake_finds_the_phrases_of_its_paper() {
        // The abstract RAKE's paper works through; it lists these among the best phrases.
        let k = keywords(EN, stop_words(whatlang::Lang::Eng), 12);
        let t: Vec<&str> = k.iter().map(|k| k.term.as_str()).collect();
        for phrase in [
            "linear diophantine equations",
            "minimal generating sets",
            "strict inequations",
            "natural numbers",
            "linear constraints",
        ] {
            assert!(t.contains(&phrase), "{phrase} not in {t:?}");
        }
        assert!(k.windows(2).all(|w| w[0].score >= w[1].score), "{k:?}");
        assert!(!t.iter().any(|t| t.split(' ').count() > MAX_PHRASE_WORDS));
        assert_eq!(terms(EN, whatlang::Lang::Eng, 3).len(), 3);
    }

    #[test]
    fn other_languages_use_their_own_stop_words() {
        let de = "Die Energiewende in Deutschland braucht erneuerbare Energien. Der Ausbau der \
                  Windkraft an Land und auf See ist dabei entscheidend. Erneuerbare Energien \
                  liefern heute mehr als die Hälfte des Stroms.";
        let t = terms(de, whatlang::Lang::Deu, 5);
        assert!(
            t.iter().any(|t| t.contains("erneuerbare energien")),
            "{t:?}"
        );
        assert!(t.contains(&"windkraft".to_string()), "{t:?}");
        let stop = stop_words(whatlang::Lang::Deu).unwrap();
        assert!(
            !t.iter().any(|t| t.split(' ').any(|w| stop.contains(w))),
            "{t:?}"
        );
    }

    #[test]
    fn without_a_stop_list_the_most_frequent_words_come_first() {
        let k = keywords("ቡና ቡና ሻይ ቡና ውሃ ሻይ", None, 2);
        assert_eq!(k[0].term, "ቡና");
        assert_eq!(k[0].score, 0.5);
        assert_eq!(k[1].term, "ሻይ");
        assert!(keywords("", None, 5).is_empty());
        assert!(keywords("the of and", stop_words(whatlang::Lang::Eng), 5).is_empty());
    }
}
