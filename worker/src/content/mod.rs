//! The operations of `content.process` (docs/content.md): plain, pure functions over text, one
//! module each, and [`process`], which runs the ones asked for on each item.
//!
//! - [`html`]: `html_to_text`, and whether a text is HTML.
//! - [`language`]: `language` (whatlang).
//! - [`keywords`]: `keywords` (RAKE with the language's stop words).
//! - [`summary`]: `summary` (TextRank, extractive).
//! - [`readability`]: `readability` (Flesch reading ease, Flesch–Kincaid grade).
//! - [`stats`]: `stats` (words, sentences, characters).
//! - [`text`]: sentences, words and stop words, which the others share.

pub mod html;
pub mod keywords;
pub mod language;
pub mod readability;
pub mod stats;
pub mod summary;
pub mod text;

use capibara_shared::domain::content::{ContentItem, ItemResult, Operation};

/// What the operations are asked for beyond the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Most keywords per item.
    pub max_keywords: usize,
    /// Sentences per summary.
    pub summary_sentences: usize,
}

impl Default for Options {
    fn default() -> Self {
        use capibara_shared::domain::content as c;
        Options {
            max_keywords: c::DEFAULT_MAX_KEYWORDS as usize,
            summary_sentences: c::DEFAULT_SUMMARY_SENTENCES as usize,
        }
    }
}

/// An item's text as plain text: `text`, else `content`, else `summary`, else `html`, else
/// `title` (the first that is not blank), converted from HTML when it is HTML (`html` always,
/// the others when they hold tags or character references), trimmed.
pub fn plain_text(item: &ContentItem) -> String {
    fn present(s: &Option<String>) -> Option<&str> {
        s.as_deref().filter(|s| !s.trim().is_empty())
    }
    let (s, is_html) = if let Some(t) = present(&item.text)
        .or_else(|| present(&item.content))
        .or_else(|| present(&item.summary))
    {
        (t, html::looks_like_html(t))
    } else if let Some(h) = present(&item.html) {
        (h, true)
    } else if let Some(t) = present(&item.title) {
        (t, html::looks_like_html(t))
    } else {
        return String::new();
    };
    if is_html {
        html::html_to_text(s)
    } else {
        s.trim().to_string()
    }
}

/// The results of `ops` on one item (only those asked for are set).
pub fn process_item(item: &ContentItem, ops: &[Operation], options: &Options) -> ItemResult {
    let text = plain_text(item);
    let wants = |op| ops.contains(&op);
    let mut r = ItemResult {
        id: item.id.clone(),
        ..Default::default()
    };
    let needs_language = [
        Operation::Language,
        Operation::Keywords,
        Operation::Summary,
        Operation::Readability,
    ]
    .into_iter()
    .any(wants);
    let info = needs_language.then(|| language::detect(&text)).flatten();
    let lang = info.as_ref().map(whatlang::Info::lang);
    let stop = lang.and_then(text::stop_words);
    let needs_sentences = [Operation::Summary, Operation::Readability, Operation::Stats]
        .into_iter()
        .any(wants);
    let sentences = if needs_sentences {
        text::sentences(&text)
    } else {
        Vec::new()
    };
    if wants(Operation::Language) {
        r.language = info.as_ref().map(language::result);
    }
    if wants(Operation::Keywords) {
        r.keywords = Some(keywords::keywords(&text, stop, options.max_keywords));
    }
    if wants(Operation::Summary) {
        r.summary = Some(summary::summarize(
            &sentences,
            stop,
            options.summary_sentences,
        ));
    }
    if wants(Operation::Readability) {
        let english = lang.is_none_or(|l| l == whatlang::Lang::Eng);
        r.readability = readability::readability(&text, sentences.len(), english);
    }
    if wants(Operation::Stats) {
        r.stats = Some(stats::stats(&text, sentences.len()));
    }
    if wants(Operation::HtmlToText) {
        r.text = Some(text);
    }
    r
}

/// [`process_item`] on every item, in order.
pub fn process(items: &[ContentItem], ops: &[Operation], options: &Options) -> Vec<ItemResult> {
    items
        .iter()
        .map(|i| process_item(i, ops, options))
        .collect()
}

/// `x` rounded to `places` decimals.
pub(crate) fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(v: serde_json::Value) -> ContentItem {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn an_items_text_is_its_first_non_blank_field_as_plain_text() {
        let t = |v| plain_text(&item(v));
        assert_eq!(
            t(serde_json::json!({"text": " plain ", "content": "x"})),
            "plain"
        );
        assert_eq!(
            t(
                serde_json::json!({"text": "", "content": "<p>from <b>content</b></p>",
                                 "summary": "s"})
            ),
            "from content"
        );
        assert_eq!(
            t(serde_json::json!({"summary": "AT&amp;T rocks"})),
            "AT&T rocks"
        );
        assert_eq!(t(serde_json::json!({"html": "a < b"})), "a < b");
        assert_eq!(
            t(serde_json::json!({"title": "Only a title"})),
            "Only a title"
        );
        assert_eq!(t(serde_json::json!({"id": "x"})), "");
    }

    #[test]
    fn only_the_operations_asked_for_are_run() {
        let it = item(serde_json::json!({"id": "7",
            "content": "<p>Rust is a programming language. It is fast and memory safe. \
                        Many developers love Rust.</p><script>var x = 1;</script>"}));
        let all = process_item(&it, &Operation::ALL, &Options::default());
        assert_eq!(all.id.as_deref(), Some("7"));
        assert_eq!(all.language.as_ref().unwrap().code, "eng");
        assert!(!all.keywords.as_ref().unwrap().is_empty());
        assert_eq!(
            all.summary.as_deref(),
            Some("Rust is a programming language. It is fast and memory safe. Many developers love Rust.")
        );
        assert!(all.readability.is_some());
        assert_eq!(all.stats.as_ref().unwrap().sentences, 3);
        assert!(!all.text.as_ref().unwrap().contains("var x"));
        let some = process_item(&it, &[Operation::Stats], &Options::default());
        assert!(some.stats.is_some());
        let v = serde_json::to_value(&some).unwrap();
        assert_eq!(
            v.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["id", "stats"]
        );
        let empty = process_item(
            &ContentItem::default(),
            &Operation::ALL,
            &Options::default(),
        );
        assert!(empty.language.is_none() && empty.readability.is_none());
        assert_eq!(empty.keywords, Some(vec![]));
        assert_eq!(empty.text.as_deref(), Some(""));
    }

    #[test]
    fn options_bound_keywords_and_summaries() {
        let text = "Solar panels convert sunlight into electricity. Wind turbines turn moving \
                    air into power. Batteries store surplus energy for later use. Smart grids \
                    balance supply and demand across regions. Heat pumps warm homes efficiently.";
        let it = item(serde_json::json!({"text": text}));
        let o = Options {
            max_keywords: 2,
            summary_sentences: 1,
        };
        let r = process_item(&it, &[Operation::Keywords, Operation::Summary], &o);
        assert_eq!(r.keywords.unwrap().len(), 2);
        assert_eq!(text::sentences(&r.summary.unwrap()).len(), 1);
    }
}
