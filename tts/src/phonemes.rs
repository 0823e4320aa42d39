//! From espeak-ng's clauses to the ids a Piper voice takes.
//!
//! Piper was trained on phonemes from a patched espeak-ng that reports how each clause ended.
//! Debian's stock 1.51 does not, so the punctuation is recovered from the text each clause
//! consumed: espeak-ng has read one character of the next clause ahead, which is dropped
//! before looking at the clause's trailing punctuation.

use std::collections::HashMap;

use unicode_normalization::UnicodeNormalization;

/// Sentence start, padding between ids, sentence end (Piper's conventions).
pub const BOS: &str = "^";
pub const PAD: &str = "_";
pub const EOS: &str = "$";

/// The mark Piper appends after a clause, from the text the clause consumed.
pub fn clause_mark(consumed: &str, last: bool) -> &'static str {
    let mut s = consumed;
    if !last {
        // Drop espeak's one character of look-ahead.
        if let Some((i, _)) = s.char_indices().next_back() {
            s = &s[..i];
        }
    }
    let s = s.trim_end();
    let s = s.trim_end_matches(['"', '\'', ')', ']', '}', '”', '’', '»']);
    let tail: String = s
        .chars()
        .rev()
        .take_while(|c| matches!(c, '.' | '!' | '?' | ',' | ';' | ':' | '…' | '—' | '–' | '-'))
        .collect();
    if tail.is_empty() {
        return "";
    }
    if tail.contains('?') {
        "?"
    } else if tail.contains('!') {
        "!"
    } else if tail.contains('…') || tail.contains("..") {
        // An ellipsis adds no mark.
        ""
    } else if tail.contains('.') {
        "."
    } else if tail.contains(',') {
        ", "
    } else if tail.contains(':') {
        ": "
    } else {
        // ';' and dashes
        "; "
    }
}

/// Join a sentence's clauses (phonemes, consumed text, last?) into Piper's phoneme string,
/// decomposed (NFD) as Piper does before mapping.
pub fn sentence_phonemes<'a>(
    clauses: impl IntoIterator<Item = (&'a str, &'a str, bool)>,
) -> String {
    let mut out = String::new();
    for (phonemes, consumed, last) in clauses {
        out.push_str(phonemes.trim());
        out.push_str(clause_mark(consumed, last));
    }
    out.trim_end().nfd().collect()
}

/// Ids for one sentence: BOS, PAD, then each known phoneme followed by PAD, then EOS.
/// Phonemes missing from the map are skipped (and counted in the second value).
pub fn to_ids(phonemes: &str, map: &HashMap<String, Vec<i64>>) -> (Vec<i64>, usize) {
    let get = |k: &str| map.get(k).map(Vec::as_slice).unwrap_or(&[]);
    let pad = get(PAD);
    let mut ids = Vec::with_capacity(phonemes.len() * 2 + 4);
    ids.extend_from_slice(get(BOS));
    ids.extend_from_slice(pad);
    let mut missing = 0;
    let mut buf = [0u8; 4];
    for c in phonemes.chars() {
        match map.get(c.encode_utf8(&mut buf) as &str) {
            Some(v) => {
                ids.extend_from_slice(v);
                ids.extend_from_slice(pad);
            }
            None => missing += 1,
        }
    }
    ids.extend_from_slice(get(EOS));
    (ids, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clause_marks_follow_piper() {
        assert_eq!(clause_mark("Hello world, t", false), ", ");
        assert_eq!(clause_mark("Is it? Y", false), "?");
        assert_eq!(clause_mark("Really?! N", false), "?");
        assert_eq!(clause_mark("Stop! N", false), "!");
        assert_eq!(clause_mark("The end.", true), ".");
        assert_eq!(clause_mark("He said \"no.\" T", false), ".");
        assert_eq!(clause_mark("Well... m", false), "");
        assert_eq!(clause_mark("Wait — t", false), "; ");
        assert_eq!(clause_mark("first; s", false), "; ");
        assert_eq!(clause_mark("as follows: o", false), ": ");
        assert_eq!(clause_mark("no punctuation", true), "");
    }

    #[test]
    fn clauses_join_with_their_marks() {
        let s = sentence_phonemes([
            ("həlˈoʊ wˈɜːld", "Hello world, t", false),
            ("ðɪs ɪz ɐ tˈɛst", "this is a test.", true),
        ]);
        assert_eq!(s, "həlˈoʊ wˈɜːld, ðɪs ɪz ɐ tˈɛst.");
    }

    #[test]
    fn ids_are_padded_and_framed() {
        let map: HashMap<String, Vec<i64>> = [("_", 0), ("^", 1), ("$", 2), ("a", 14), ("b", 15)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), vec![v]))
            .collect();
        let (ids, missing) = to_ids("ab?", &map);
        assert_eq!(ids, [1, 0, 14, 0, 15, 0, 2]);
        assert_eq!(missing, 1);
    }
}
