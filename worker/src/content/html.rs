//! `html_to_text`: HTML to plain text.

/// Elements whose content is not text a reader sees: left out with everything inside them.
const SKIPPED: &[&str] = &[
    "script", "style", "noscript", "template", "head", "title", "svg", "math", "iframe", "object",
    "embed", "canvas", "select", "textarea",
];

/// Blocks set off by a blank line.
const PARAGRAPHS: &[&str] = &[
    "p",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "blockquote",
    "pre",
    "ul",
    "ol",
    "dl",
    "table",
    "figure",
    "hr",
    "section",
    "article",
    "header",
    "footer",
    "nav",
    "aside",
    "main",
    "address",
    "details",
    "fieldset",
    "form",
];

/// Blocks that start a line.
const LINES: &[&str] = &[
    "div",
    "li",
    "dt",
    "dd",
    "tr",
    "figcaption",
    "caption",
    "summary",
    "legend",
    "option",
];

/// Whether `s` looks like HTML: it has a tag (`<p>`, `</a>`, `<!-- -->`) or a character
/// reference (`&amp;`, `&#8217;`). A feed's `content` and `summary` are HTML in most feeds.
pub fn looks_like_html(s: &str) -> bool {
    let b = s.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'<' if b
                .get(i + 1)
                .is_some_and(|n| n.is_ascii_alphabetic() || *n == b'/' || *n == b'!')
                && b[i..].contains(&b'>') =>
            {
                return true
            }
            b'&' => {
                let rest = &b[i + 1..b.len().min(i + 34)];
                let body = rest.strip_prefix(b"#").unwrap_or(rest);
                let n = body
                    .iter()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .count();
                if n > 0 && body.get(n) == Some(&b';') {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

/// HTML to plain text, the way a browser shows it: the text nodes of the document (character
/// references decoded), parsed by html5ever (the HTML5 parsing algorithm, through the `scraper`
/// crate) so broken markup is read as a browser reads it. Runs of whitespace collapse to one
/// space except in `<pre>`; paragraphs, headings, lists and tables are set off by a blank line,
/// `<br>`, `<div>`, list items and table rows start a line, table cells are separated by a
/// space. What a reader does not see is left out: `<head>`, `<script>`, `<style>`,
/// `<noscript>`, `<template>`, `<svg>`, `<iframe>`, form controls, comments.
pub fn html_to_text(html: &str) -> String {
    let start = html
        .trim_start()
        .get(..9)
        .unwrap_or("")
        .to_ascii_lowercase();
    let doc = if start.starts_with("<!doctype") || start.starts_with("<html") {
        scraper::Html::parse_document(html)
    } else {
        scraper::Html::parse_fragment(html)
    };
    element_text(doc.root_element())
}

/// The text of `el` and what it holds, as [`html_to_text`] reads a document (the `web`
/// connector reads its items with it).
pub fn element_text(el: scraper::ElementRef<'_>) -> String {
    let mut out = Out::default();
    let mut pre = 0usize;
    // A walk with a stack of its own: deeply nested markup must not exhaust the thread's stack.
    let mut stack = vec![(*el, false)];
    while let Some((node, closing)) = stack.pop() {
        match node.value() {
            scraper::Node::Text(t) if !closing => out.text(t, pre > 0),
            scraper::Node::Element(e) => {
                let name = e.name();
                if !closing && SKIPPED.contains(&name) {
                    continue;
                }
                let block = if PARAGRAPHS.contains(&name) {
                    2
                } else if LINES.contains(&name) {
                    1
                } else {
                    0
                };
                out.block(block);
                match name {
                    "br" if !closing => out.block(1),
                    "td" | "th" => out.space = true,
                    "pre" if closing => pre = pre.saturating_sub(1),
                    "pre" => pre += 1,
                    _ => {}
                }
                if !closing {
                    stack.push((node, true));
                    stack.extend(node.children().rev().map(|c| (c, false)));
                }
            }
            scraper::Node::Document | scraper::Node::Fragment if !closing => {
                stack.extend(node.children().rev().map(|c| (c, false)));
            }
            _ => {}
        }
    }
    out.s
}

/// Text being written: whitespace and line breaks are held back until more text follows, so
/// the result has none at its ends and no trailing spaces.
#[derive(Default)]
struct Out {
    s: String,
    space: bool,
    breaks: usize,
}

impl Out {
    fn text(&mut self, t: &str, pre: bool) {
        for c in t.chars() {
            match c {
                '\n' if pre => self.block((self.breaks + 1).min(2)),
                '\r' if pre => {}
                c if pre => self.push(c),
                c if c.is_whitespace() => self.space = true,
                c => self.push(c),
            }
        }
    }

    fn block(&mut self, breaks: usize) {
        self.breaks = self.breaks.max(breaks);
    }

    fn push(&mut self, c: char) {
        if !self.s.is_empty() {
            if self.breaks > 0 {
                self.s.push_str(&"\n".repeat(self.breaks));
            } else if self.space {
                self.s.push(' ');
            }
        }
        self.breaks = 0;
        self.space = false;
        self.s.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_told_from_text() {
        assert!(looks_like_html("<p>Hello</p>"));
        assert!(looks_like_html("Tom &amp; Jerry"));
        assert!(looks_like_html("it&#8217;s"));
        assert!(looks_like_html("a<br/>b"));
        assert!(!looks_like_html("if a < b and c > d then"));
        assert!(!looks_like_html("Tom & Jerry; Laurel & Hardy"));
        assert!(!looks_like_html("Plain words."));
    }

    #[test]
    fn a_feed_entry_becomes_readable_text() {
        let html = r#"<h2>Rust 1.85</h2><p>The Rust team is <b>happy</b> to announce
            a new   version.<br>Read the <a href="/notes">notes</a>&nbsp;&amp; enjoy!</p>
            <script>alert("x")</script><style>p { color: red }</style>
            <ul><li>Edition 2024</li><li>Async closures</li></ul>
            <table><tr><td>a</td><td>b</td></tr><tr><th>c</th><td>d</td></tr></table>"#;
        assert_eq!(
            html_to_text(html),
            "Rust 1.85\n\nThe Rust team is happy to announce a new version.\nRead the notes \
             & enjoy!\n\nEdition 2024\nAsync closures\n\na b\nc d"
        );
    }

    #[test]
    fn documents_lose_their_head_and_keep_pre_formatting() {
        let html = "<!DOCTYPE html><html><head><title>T</title><meta charset=utf-8></head>\
                    <body><p>Größe &uuml;ber alles.</p><pre>fn main() {\n    x();\n}</pre>\
                    <noscript>enable js</noscript><!-- a comment --></body></html>";
        assert_eq!(
            html_to_text(html),
            "Größe über alles.\n\nfn main() {\n    x();\n}"
        );
    }

    #[test]
    fn broken_and_deep_markup_is_read_like_a_browser_reads_it() {
        assert_eq!(
            html_to_text("<p>one<p>two</div> <i>three"),
            "one\n\ntwo three"
        );
        let deep = format!(
            "{}deep{}",
            "<span>".repeat(50_000),
            "</span>".repeat(50_000)
        );
        assert_eq!(html_to_text(&deep), "deep");
        assert_eq!(html_to_text(""), "");
    }
}
