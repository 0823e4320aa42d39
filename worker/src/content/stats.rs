//! `stats`: counts over a text.

use capibara_shared::domain::content::TextStats;

use super::text::words;

/// Words ([`words`]: Unicode word boundaries, each CJK ideograph one), `sentences` (as
/// [`super::text::sentences`] found them), characters (Unicode scalar values, whitespace
/// included) and words per sentence (two decimals, 0 without a sentence).
pub fn stats(text: &str, sentences: usize) -> TextStats {
    let n = words(text).count();
    TextStats {
        words: n as u64,
        sentences: sentences as u64,
        characters: text.chars().count() as u64,
        avg_words_per_sentence: if sentences == 0 {
            0.0
        } else {
            super::round(n as f64 / sentences as f64, 2)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::super::text::sentences;
    use super::*;

    fn of(text: &str) -> TextStats {
        stats(text, sentences(text).len())
    }

    #[test]
    fn counts_words_sentences_and_characters() {
        let s = of("Hello, world! How are you today? Fine.");
        assert_eq!((s.words, s.sentences, s.characters), (7, 3, 38));
        assert_eq!(s.avg_words_per_sentence, 2.33);
        let de = of("Schöne Grüße aus München. Bis bald!");
        assert_eq!((de.words, de.sentences, de.characters), (6, 2, 35));
        assert_eq!(de.avg_words_per_sentence, 3.0);
        let ja = of("東京に行く。");
        assert_eq!((ja.sentences, ja.characters), (1, 6));
        let empty = of("");
        assert_eq!(
            (empty.words, empty.sentences, empty.avg_words_per_sentence),
            (0, 0, 0.0)
        );
    }
}
