//! Sentence splitting: the unit of rendering and of streaming.
//!
//! Each sentence is one model call and one `JobOutputChunk`, so the first sentence can be heard
//! while the rest render. The split happens before phonemization so the number of chunks is
//! known up front (the WebSocket protocol sends `total_chunks` with the first frame).

/// Sentences longer than this are cut at clause punctuation (or, failing that, at a space) so
/// one model call stays bounded in time and memory.
pub const MAX_SENTENCE_CHARS: usize = 400;

/// Words after which a period does not end a sentence.
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no", "approx",
    "fig", "mt", "inc", "ltd", "co", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec",
];

/// Split `text` into trimmed, non-empty sentences, in order.
///
/// A sentence ends at `.`, `!`, `?` or `…` (with any closing quotes or brackets) followed by
/// white space, unless the period follows a known abbreviation or a single letter ("J. Smith"),
/// or the next word starts with a lower-case letter. A line break with an empty line after it
/// (a paragraph) always ends a sentence.
pub fn split_sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for paragraph in split_paragraphs(text) {
        let chars: Vec<(usize, char)> = paragraph.char_indices().collect();
        let mut start = 0usize;
        let mut i = 0usize;
        while i < chars.len() {
            let (_, c) = chars[i];
            if matches!(c, '.' | '!' | '?' | '…') {
                // Take the whole run of terminators and closing marks: `?!`, `..."`, `.)`.
                let mut j = i + 1;
                while j < chars.len()
                    && matches!(
                        chars[j].1,
                        '.' | '!' | '?' | '…' | '"' | '\'' | ')' | ']' | '”' | '’' | '»'
                    )
                {
                    j += 1;
                }
                let at_end = j >= chars.len();
                let space_follows = !at_end && chars[j].1.is_whitespace();
                if at_end || space_follows {
                    let end_byte = if at_end { paragraph.len() } else { chars[j].0 };
                    let candidate = &paragraph[start..end_byte];
                    if at_end || ends_sentence(candidate, c, &paragraph[end_byte..]) {
                        push_sentence(&mut out, candidate);
                        start = end_byte;
                    }
                }
                i = j;
            } else {
                i += 1;
            }
        }
        push_sentence(&mut out, &paragraph[start..]);
    }
    out
}

/// Words the first sentence needs on each side of a clause break before it is split there.
const FIRST_CLAUSE_MIN_WORDS: usize = 3;

/// Sentences for streaming: [`split_sentences`], with the first sentence cut at its first
/// clause break (`,` `;` `:` or a dash) when at least three words lie on each side. The first
/// chunk is what a listener waits for, and render time grows with length; a clause break is a
/// pause in the speech anyway (Piper voices render the comma as one), so the cut is not heard.
pub fn split_for_streaming(text: &str) -> Vec<String> {
    let mut sentences = split_sentences(text);
    if let Some(first) = sentences.first().cloned() {
        if let Some((head, tail)) = first_clause(&first) {
            sentences.splice(0..1, [head, tail]);
        }
    }
    sentences
}

fn first_clause(sentence: &str) -> Option<(String, String)> {
    let words: Vec<&str> = sentence.split_whitespace().collect();
    for i in FIRST_CLAUSE_MIN_WORDS - 1..words.len().saturating_sub(FIRST_CLAUSE_MIN_WORDS) {
        let w = words[i];
        let next = words[i + 1];
        if w.ends_with([',', ';', ':']) || matches!(next, "—" | "–" | "-") {
            let cut = if w.ends_with([',', ';', ':']) {
                i + 1
            } else {
                i + 2
            };
            if words.len() - cut < FIRST_CLAUSE_MIN_WORDS {
                return None;
            }
            return Some((words[..cut].join(" "), words[cut..].join(" ")));
        }
    }
    None
}

fn split_paragraphs(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\n' {
            // A blank line (only spaces between two line breaks) ends a paragraph.
            let mut j = i + 1;
            while j < bytes.len() && (bytes[j] == b' ' || bytes[j] == b'\t' || bytes[j] == b'\r') {
                j += 1;
            }
            if j < bytes.len() && bytes[j] == b'\n' {
                parts.push(&text[start..i]);
                start = j + 1;
                i = j + 1;
                continue;
            }
        }
        i += 1;
    }
    parts.push(&text[start..]);
    parts
}

/// Whether a terminator ending `candidate` ends a sentence, given what follows.
fn ends_sentence(candidate: &str, terminator: char, rest: &str) -> bool {
    let next = rest.trim_start().chars().next();
    if next.is_some_and(|n| n.is_lowercase()) {
        return false;
    }
    if terminator != '.' {
        return true;
    }
    let body = candidate.trim_end_matches(['.', '"', '\'', ')', ']', '”', '’', '»']);
    let last_word = body
        .rsplit(|c: char| c.is_whitespace() || c == '(' || c == '"')
        .next()
        .unwrap_or("");
    let lower = last_word.to_lowercase();
    if ABBREVIATIONS.contains(&lower.as_str()) {
        return false;
    }
    // "J. Smith", "U.S. Army": a single letter before the period.
    let mut letters = last_word.chars().rev();
    if let (Some(l), None | Some('.')) = (letters.next(), letters.next()) {
        if l.is_alphabetic() {
            return false;
        }
    }
    true
}

fn push_sentence(out: &mut Vec<String>, s: &str) {
    let s = s.trim();
    if s.is_empty() {
        return;
    }
    if s.chars().count() <= MAX_SENTENCE_CHARS {
        out.push(normalize_space(s));
        return;
    }
    let mut rest = s;
    while rest.chars().count() > MAX_SENTENCE_CHARS {
        let limit = rest
            .char_indices()
            .nth(MAX_SENTENCE_CHARS)
            .map(|(b, _)| b)
            .unwrap_or(rest.len());
        let head = &rest[..limit];
        let cut = head
            .rfind([',', ';', ':'])
            .map(|b| b + 1)
            .filter(|b| *b > limit / 3)
            .or_else(|| head.rfind(char::is_whitespace).filter(|b| *b > 0))
            .unwrap_or(limit);
        let piece = rest[..cut].trim();
        if !piece.is_empty() {
            out.push(normalize_space(piece));
        }
        rest = rest[cut..].trim_start();
    }
    if !rest.trim().is_empty() {
        out.push(normalize_space(rest.trim()));
    }
}

/// Collapse runs of white space (line breaks inside a sentence) into single spaces.
fn normalize_space(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paragraph_splits_at_sentence_ends() {
        let s = split_sentences("Hello world. How are you? I am fine! Thanks…");
        assert_eq!(s, ["Hello world.", "How are you?", "I am fine!", "Thanks…"]);
    }

    #[test]
    fn abbreviations_initials_and_numbers_do_not_split() {
        let s = split_sentences("Dr. Smith met J. R. Doe at 3.5 p.m. today. Then e.g. tea.");
        assert_eq!(
            s,
            [
                "Dr. Smith met J. R. Doe at 3.5 p.m. today.",
                "Then e.g. tea."
            ]
        );
    }

    #[test]
    fn quotes_and_mixed_terminators_stay_with_their_sentence() {
        let s = split_sentences("He said \"stop.\" She asked why?! Nobody knew...");
        assert_eq!(
            s,
            ["He said \"stop.\"", "She asked why?!", "Nobody knew..."]
        );
    }

    #[test]
    fn a_lower_case_continuation_is_not_a_new_sentence() {
        assert_eq!(
            split_sentences("Wait... what happened"),
            ["Wait... what happened"]
        );
    }

    #[test]
    fn blank_lines_end_sentences_and_line_breaks_become_spaces() {
        let s = split_sentences("Title without a period\n\nFirst line\ncontinues here.  ");
        assert_eq!(s, ["Title without a period", "First line continues here."]);
    }

    #[test]
    fn streaming_cuts_the_first_sentence_at_its_first_clause() {
        let s = split_for_streaming(
            "When the job starts, the first clause plays early, then the rest. Second one, too.",
        );
        assert_eq!(
            s,
            [
                "When the job starts,",
                "the first clause plays early, then the rest.",
                "Second one, too."
            ]
        );
        // Too few words on one side, or no break: whole sentences.
        assert_eq!(split_for_streaming("Yes, it works."), ["Yes, it works."]);
        assert_eq!(
            split_for_streaming("No breaks in this sentence at all. Next."),
            ["No breaks in this sentence at all.", "Next."]
        );
        assert_eq!(
            split_for_streaming("One two three — four five six."),
            ["One two three —", "four five six."]
        );
    }

    #[test]
    fn empty_and_blank_text_has_no_sentences() {
        assert!(split_sentences("").is_empty());
        assert!(split_sentences(" \n\n\t ").is_empty());
    }

    #[test]
    fn very_long_sentences_are_cut_at_clauses_or_spaces() {
        let clause = "this clause keeps going without end, ";
        let long = clause.repeat(40);
        let s = split_sentences(&long);
        assert!(s.len() > 1);
        assert!(s.iter().all(|p| p.chars().count() <= MAX_SENTENCE_CHARS));
        assert!(s[0].ends_with(','));
        let words: usize = s.iter().map(|p| p.split_whitespace().count()).sum();
        assert_eq!(words, long.split_whitespace().count());

        let no_commas = "word ".repeat(300);
        let s = split_sentences(&no_commas);
        assert!(s.iter().all(|p| p.chars().count() <= MAX_SENTENCE_CHARS));
        assert_eq!(
            s.iter()
                .map(|p| p.split_whitespace().count())
                .sum::<usize>(),
            300
        );
    }
}
