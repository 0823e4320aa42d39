//! `language`: which language a text is in.

use capibara_shared::domain::content::LanguageResult;

/// Bytes of a text looked at: plenty for trigram statistics, and a bound on the time taken.
const SAMPLE_BYTES: usize = 20_000;

/// The language of `text`, by the `whatlang` crate: the script decides first (a script with
/// one language, such as Greek or Hebrew, decides alone), then trigram frequency profiles of
/// the script's languages (70 languages in all). Only the first 20,000 bytes are looked at.
/// `None` when the text has no letters to go by.
pub fn detect(text: &str) -> Option<whatlang::Info> {
    let mut end = text.len().min(SAMPLE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    whatlang::detect(&text[..end])
}

/// A detection as the result reports it: ISO 639-3 code, English name, confidence (three
/// decimals), reliability.
pub fn result(info: &whatlang::Info) -> LanguageResult {
    LanguageResult {
        code: info.lang().code().to_string(),
        name: info.lang().eng_name().to_string(),
        confidence: super::round(info.confidence(), 3),
        reliable: info.is_reliable(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> String {
        result(&detect(text).unwrap()).code
    }

    #[test]
    fn languages_are_told_apart() {
        let en = detect(
            "The quick brown fox jumps over the lazy dog while the farmer watches from the \
             porch. Later that evening, the whole family gathered around the table to share \
             stories about the animals that live on their farm.",
        )
        .unwrap();
        let r = result(&en);
        assert_eq!((r.code.as_str(), r.name.as_str()), ("eng", "English"));
        assert!(r.reliable && r.confidence > 0.5, "{r:?}");
        assert_eq!(
            code("Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer zusieht."),
            "deu"
        );
        assert_eq!(
            code("El rápido zorro marrón salta sobre el perro perezoso mientras el granjero mira."),
            "spa"
        );
        assert_eq!(
            code("Быстрая коричневая лиса прыгает через ленивую собаку, пока фермер смотрит."),
            "rus"
        );
        assert_eq!(
            code("東京は日本の首都であり、多くの人々が住んでいます。"),
            "jpn"
        );
        assert!(detect("1234 !!! ...").is_none());
        assert!(detect("").is_none());
    }

    #[test]
    fn long_texts_are_sampled_at_a_character_boundary() {
        let long = "Über die Brücke gehen wir jeden Morgen zur Arbeit. ".repeat(2_000);
        assert_eq!(code(&long), "deu");
    }
}
