//! `readability`: how hard a text is to read.

use capibara_shared::domain::content::Readability;

use super::text::words;

/// The Flesch reading ease and Flesch–Kincaid grade of a text of `sentences` sentences (two
/// decimals): reading ease = 206.835 − 1.015 × words/sentence − 84.6 × syllables/word (90-100
/// very easy, 60-70 plain English, 0-30 very hard), grade = 0.39 × words/sentence + 11.8 ×
/// syllables/word − 15.59 (a US school grade). Words with a letter count ([`syllables`] for
/// theirs). The formulas and their constants are English's: for other languages the numbers
/// rank texts of one language against each other but are not calibrated (German, French and
/// Spanish have adaptations of their own, not applied here). `None` without a word.
pub fn readability(text: &str, sentences: usize, english: bool) -> Option<Readability> {
    let (mut n, mut syl) = (0usize, 0usize);
    for w in words(text).filter(|w| w.chars().any(char::is_alphabetic)) {
        n += 1;
        syl += syllables(w, english);
    }
    if n == 0 {
        return None;
    }
    let wps = n as f64 / sentences.max(1) as f64;
    let spw = syl as f64 / n as f64;
    Some(Readability {
        flesch_reading_ease: super::round(206.835 - 1.015 * wps - 84.6 * spw, 2),
        flesch_kincaid_grade: super::round(0.39 * wps + 11.8 * spw - 15.59, 2),
    })
}

/// The syllables of a word, by a heuristic: its groups of vowels (Latin with diacritics,
/// Greek and Cyrillic; `y` is a vowel except first), at least one. For English (`english`)
/// a silent final `e` ("make", but not "table"), `-ed` ("jumped", but not "wanted") and `-es`
/// ("makes", but not "boxes") take one off. Scripts without vowel letters (Chinese, Arabic,
/// Hebrew, …) count one per word.
pub fn syllables(word: &str, english: bool) -> usize {
    let w: Vec<char> = word.to_lowercase().chars().collect();
    let mut groups = 0;
    let mut in_group = false;
    for (i, &c) in w.iter().enumerate() {
        let v = vowel(c) && !(c == 'y' && i == 0);
        if v && !in_group {
            groups += 1;
        }
        in_group = v;
    }
    if english && groups > 1 {
        // at(1) is the last letter, at(2) the one before, …
        let at = |k: usize| w.len().checked_sub(k).map(|i| w[i]);
        let consonant = |c: Option<char>| c.is_some_and(|c| c.is_alphabetic() && !vowel(c));
        let silent = match (at(2), at(1)) {
            // "table" keeps it, "male" does not.
            (Some('l'), Some('e')) => !consonant(at(3)),
            // "make", not "agree".
            (p, Some('e')) => consonant(p),
            // "jumped", "played"; not "wanted", "needed".
            (Some('e'), Some('d')) => {
                (consonant(at(3)) || at(3) == Some('y')) && !matches!(at(3), Some('t' | 'd'))
            }
            // "makes"; not "boxes", "wishes", "watches", "changes".
            (Some('e'), Some('s')) => {
                consonant(at(3))
                    && !matches!(at(3), Some('s' | 'x' | 'z' | 'c' | 'g'))
                    && !(at(3) == Some('h') && matches!(at(4), Some('s' | 'c')))
            }
            _ => false,
        };
        if silent {
            groups -= 1;
        }
    }
    groups.max(1)
}

fn vowel(c: char) -> bool {
    matches!(c,
        'a' | 'e' | 'i' | 'o' | 'u' | 'y'
        | 'à'..='æ' | 'è'..='ï' | 'ò'..='ö' | 'ø'..='ý' | 'ÿ' | 'œ'
        | 'ā' | 'ă' | 'ą' | 'ē' | 'ė' | 'ę' | 'ě' | 'ī' | 'į' | 'ı' | 'ō' | 'ő' | 'ū' | 'ů' | 'ű'
        | 'ų'
        | 'а' | 'е' | 'ё' | 'и' | 'о' | 'у' | 'ы' | 'э' | 'ю' | 'я' | 'і' | 'ї' | 'є'
        | 'α' | 'ε' | 'η' | 'ι' | 'ο' | 'υ' | 'ω' | 'ά' | 'έ' | 'ή' | 'ί' | 'ό' | 'ύ' | 'ώ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syllables_of_english_words() {
        for (word, n) in [
            ("the", 1),
            ("cat", 1),
            ("make", 1),
            ("table", 2),
            ("simple", 2),
            ("jumped", 1),
            ("played", 1),
            ("male", 1),
            ("agree", 2),
            ("watches", 2),
            ("wanted", 2),
            ("makes", 1),
            ("boxes", 2),
            ("wishes", 2),
            ("beautiful", 3),
            ("readability", 5),
            ("yes", 1),
            ("rhythm", 1),
            ("queue", 1),
            ("I", 1),
        ] {
            assert_eq!(syllables(word, true), n, "{word}");
        }
        // Elsewhere the final e is spoken.
        assert_eq!(syllables("Straße", false), 2);
        assert_eq!(syllables("gehe", false), 2);
        assert_eq!(syllables("молоко", false), 3);
        assert_eq!(syllables("東京", false), 1);
    }

    #[test]
    fn plain_text_reads_easier_than_dense_text() {
        let easy = readability("The cat sat on the mat. The dog ran to the cat.", 2, true).unwrap();
        // 12 words, 2 sentences, 12 syllables.
        assert_eq!(easy.flesch_reading_ease, 116.15);
        assert_eq!(easy.flesch_kincaid_grade, -1.45);
        let hard = readability(
            "Institutional considerations notwithstanding, comprehensive interdisciplinary \
             evaluation methodologies necessitate substantial organizational commitment.",
            1,
            true,
        )
        .unwrap();
        assert!(hard.flesch_reading_ease < 0.0, "{hard:?}");
        assert!(hard.flesch_kincaid_grade > 20.0, "{hard:?}");
        let de = readability(
            "Die Katze schläft auf dem Sofa. Der Hund spielt im Garten.",
            2,
            false,
        )
        .unwrap();
        assert!(de.flesch_reading_ease > 70.0, "{de:?}");
        assert!(readability("... 42 ...", 1, true).is_none());
    }
}
