//! What the operations share: sentences, words and stop words.

use std::{
    collections::{HashMap, HashSet},
    sync::OnceLock,
};

use unicode_segmentation::UnicodeSegmentation;

/// Words whose period does not end a sentence ("Dr. Smith", "e.g. this").
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "sr", "sra", "jr", "st", "mt", "vs", "e.g", "i.e", "cf",
    "fig", "no", "nr", "vol", "approx", "ca", "gen", "col", "lt", "sgt", "rev", "hon", "mme",
    "mlle", "z.b", "dra",
];

/// The text's sentences, trimmed, by the Unicode sentence boundaries (UAX #29, which handles
/// any script and treats a line break as the end of a sentence), with two corrections: a
/// period after a common abbreviation ("Dr.", "e.g.") or an initial ("J. R. R. Tolkien") does
/// not end a sentence, and pieces without a letter or digit are dropped.
pub fn sentences(text: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    let mut start: Option<usize> = None;
    for (i, piece) in text.split_sentence_bound_indices() {
        let begin = start.unwrap_or(i);
        let end = i + piece.len();
        if !piece.contains('\n') && continues(piece.trim_end()) {
            start = Some(begin);
            continue;
        }
        start = None;
        push_sentence(&mut out, &text[begin..end]);
    }
    if let Some(begin) = start {
        push_sentence(&mut out, &text[begin..]);
    }
    out
}

fn push_sentence<'a>(out: &mut Vec<&'a str>, s: &'a str) {
    let s = s.trim();
    if s.chars().any(char::is_alphanumeric) {
        out.push(s);
    }
}

/// Whether a piece ending in a period continues: its last word is an abbreviation or an
/// initial.
fn continues(piece: &str) -> bool {
    let Some(body) = piece.strip_suffix('.') else {
        return false;
    };
    let last = body
        .rsplit(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or("");
    let mut chars = last.chars();
    let initial = matches!((chars.next(), chars.next()), (Some(c), None) if c.is_uppercase());
    initial || ABBREVIATIONS.contains(&last.to_lowercase().as_str())
}

/// The words of `s` (Unicode word boundaries, UAX #29): runs of letters and digits, with
/// inner apostrophes and periods ("don't", "3.14"); each CJK ideograph is a word of its own.
pub fn words(s: &str) -> impl Iterator<Item = &str> {
    s.unicode_words()
}

/// A word as stop lists and counts compare it: lowercase, typographic apostrophes made plain.
pub fn normalize(word: &str) -> String {
    word.to_lowercase().replace(['\u{2019}', '\u{02BC}'], "'")
}

/// The stop words of `lang`: NLTK's list where it has one, else stopwords-iso's (the
/// `stop-words` crate); `None` for a language neither covers.
pub fn stop_words(lang: whatlang::Lang) -> Option<&'static HashSet<&'static str>> {
    static SETS: OnceLock<HashMap<whatlang::Lang, HashSet<&'static str>>> = OnceLock::new();
    SETS.get_or_init(|| {
        whatlang::Lang::all()
            .iter()
            .filter_map(|&l| {
                let words = stop_words::lookup(iso639_1(l)?)?;
                Some((l, words.iter().copied().collect()))
            })
            .collect()
    })
    .get(&lang)
}

/// The ISO 639-1 code of a language whatlang knows, where there is one (Norwegian Bokmål as
/// `no`, the code the stop lists use).
pub fn iso639_1(lang: whatlang::Lang) -> Option<&'static str> {
    use whatlang::Lang::*;
    Some(match lang {
        Epo => "eo",
        Eng => "en",
        Rus => "ru",
        Cmn => "zh",
        Spa => "es",
        Por => "pt",
        Ita => "it",
        Ben => "bn",
        Fra => "fr",
        Deu => "de",
        Ukr => "uk",
        Kat => "ka",
        Ara => "ar",
        Hin => "hi",
        Jpn => "ja",
        Heb => "he",
        Yid => "yi",
        Pol => "pl",
        Amh => "am",
        Jav => "jv",
        Kor => "ko",
        Nob => "no",
        Dan => "da",
        Swe => "sv",
        Fin => "fi",
        Tur => "tr",
        Nld => "nl",
        Hun => "hu",
        Ces => "cs",
        Ell => "el",
        Bul => "bg",
        Bel => "be",
        Mar => "mr",
        Kan => "kn",
        Ron => "ro",
        Slv => "sl",
        Hrv => "hr",
        Srp => "sr",
        Mkd => "mk",
        Lit => "lt",
        Lav => "lv",
        Est => "et",
        Tam => "ta",
        Vie => "vi",
        Urd => "ur",
        Tha => "th",
        Guj => "gu",
        Uzb => "uz",
        Pan => "pa",
        Aze => "az",
        Ind => "id",
        Tel => "te",
        Pes => "fa",
        Mal => "ml",
        Ori => "or",
        Mya => "my",
        Nep => "ne",
        Sin => "si",
        Khm => "km",
        Tuk => "tk",
        Aka => "ak",
        Zul => "zu",
        Sna => "sn",
        Afr => "af",
        Lat => "la",
        Slk => "sk",
        Cat => "ca",
        Tgl => "tl",
        Hye => "hy",
        Cym => "cy",
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_end_at_periods_but_not_after_abbreviations_and_initials() {
        let text = "Dr. Smith met J. R. R. Tolkien in 1950. They talked, e.g. about \
                    languages! Did it rain?\nA heading\n\n  ...  ";
        assert_eq!(
            sentences(text),
            [
                "Dr. Smith met J. R. R. Tolkien in 1950.",
                "They talked, e.g. about languages!",
                "Did it rain?",
                "A heading",
            ]
        );
        assert_eq!(
            sentences("Das ist z.B. gut. Herr Dr. Müller kommt um 3.30 Uhr. ¿Qué tal?"),
            [
                "Das ist z.B. gut.",
                "Herr Dr. Müller kommt um 3.30 Uhr.",
                "¿Qué tal?"
            ]
        );
        assert_eq!(
            sentences("東京は大きい。人が多い。"),
            ["東京は大きい。", "人が多い。"]
        );
        assert!(sentences("  \n ").is_empty());
    }

    #[test]
    fn words_are_unicode_words() {
        let w: Vec<&str> = words("Don’t stop: 3.14 is π, naïve café!").collect();
        assert_eq!(w, ["Don’t", "stop", "3.14", "is", "π", "naïve", "café"]);
        assert_eq!(normalize("Don’t"), "don't");
    }

    #[test]
    fn every_language_with_a_stop_list_gets_it() {
        let en = stop_words(whatlang::Lang::Eng).unwrap();
        assert!(en.contains("the") && en.contains("don't") && !en.contains("computer"));
        assert!(stop_words(whatlang::Lang::Deu).unwrap().contains("und"));
        assert!(stop_words(whatlang::Lang::Pol).unwrap().contains("jest"));
        assert!(stop_words(whatlang::Lang::Amh).is_none());
        for &l in whatlang::Lang::all() {
            assert!(iso639_1(l).is_some(), "{l:?}");
        }
    }
}
