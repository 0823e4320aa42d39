//! `text.chunk`'s cutting: a text into pieces that each fit the encoder's window, counted in
//! the encoder's own tokens (MiniLM's WordPiece), either whole sentences packed together
//! (Unicode sentence boundaries, UAX #29) or fixed windows of tokens with an overlap.

use capibara_shared::domain::kinds::model::{Chunk, ChunkStrategy};
use tokenizers::Tokenizer;
use unicode_segmentation::UnicodeSegmentation;

/// Tokens a chunk leaves for the markers the encoder adds (`[CLS]`, `[SEP]`).
const MARKERS: usize = 2;

/// The encoder's tokenizer from its `tokenizer.json`, counting every token of a text (no
/// truncation, no padding, whatever the file configures).
pub fn load_tokenizer(path: &std::path::Path) -> Result<Tokenizer, String> {
    let mut t = Tokenizer::from_file(path).map_err(|e| e.to_string())?;
    t.with_truncation(None).map_err(|e| e.to_string())?;
    t.with_padding(None);
    Ok(t)
}

/// The tokens of `text` as byte ranges of it.
fn token_spans(tokenizer: &Tokenizer, text: &str) -> Result<Vec<(usize, usize)>, String> {
    let enc = tokenizer.encode(text, false).map_err(|e| e.to_string())?;
    Ok(enc.get_offsets().to_vec())
}

/// A chunk of `text` from byte `a` to byte `b`, with its char offsets.
fn chunk(text: &str, a: usize, b: usize, tokens: usize) -> Chunk {
    let start = text[..a].chars().count();
    let piece = &text[a..b];
    Chunk {
        text: piece.to_string(),
        start,
        end: start + piece.chars().count(),
        tokens,
    }
}

/// Windows of `size` tokens of the tokens `spans` (byte ranges of `text`), each starting
/// `size - overlap` tokens after the one before.
fn windows(text: &str, spans: &[(usize, usize)], size: usize, overlap: usize) -> Vec<Chunk> {
    let step = size.saturating_sub(overlap).max(1);
    let mut out = Vec::new();
    let mut i = 0;
    while i < spans.len() {
        let j = (i + size).min(spans.len());
        out.push(chunk(text, spans[i].0, spans[j - 1].1, j - i));
        if j == spans.len() {
            break;
        }
        i += step;
    }
    out
}

/// Cut `text` into chunks of at most `max_tokens` tokens, the markers included.
pub fn chunk_text(
    tokenizer: &Tokenizer,
    text: &str,
    strategy: ChunkStrategy,
    max_tokens: usize,
    overlap: usize,
) -> Result<Vec<Chunk>, String> {
    let size = max_tokens.saturating_sub(MARKERS).max(1);
    match strategy {
        ChunkStrategy::Tokens => {
            let spans = token_spans(tokenizer, text)?;
            Ok(windows(text, &spans, size, overlap))
        }
        ChunkStrategy::Sentence => {
            let mut out = Vec::new();
            // The chunk being filled: its first byte, last byte and tokens.
            let mut open: Option<(usize, usize, usize)> = None;
            for (at, sentence) in text.split_sentence_bound_indices() {
                let spans: Vec<(usize, usize)> = token_spans(tokenizer, sentence)?
                    .into_iter()
                    .map(|(a, b)| (at + a, at + b))
                    .collect();
                let Some(&(first, _)) = spans.first() else {
                    continue;
                };
                let last = spans[spans.len() - 1].1;
                if spans.len() > size {
                    // Longer than a chunk: its own windows.
                    if let Some((a, b, n)) = open.take() {
                        out.push(chunk(text, a, b, n));
                    }
                    out.extend(windows(text, &spans, size, overlap));
                    continue;
                }
                open = match open {
                    Some((a, _, n)) if n + spans.len() <= size => Some((a, last, n + spans.len())),
                    Some((a, b, n)) => {
                        out.push(chunk(text, a, b, n));
                        Some((first, last, spans.len()))
                    }
                    None => Some((first, last, spans.len())),
                };
            }
            if let Some((a, b, n)) = open {
                out.push(chunk(text, a, b, n));
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::encoder::Encoder;

    fn tokenizer() -> Tokenizer {
        let assets = std::env::var_os("CAPIBARA_ASSETS_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.capibara/assets")
            });
        load_tokenizer(&Encoder::dir(&assets).join("tokenizer.json")).expect(
            "the MiniLM tokenizer (deploy/fetch-assets.sh installs it; deploy/test.sh runs that)",
        )
    }

    #[test]
    fn sentences_are_packed_and_windows_overlap() {
        let t = tokenizer();
        let text = "The cat sat on the mat. It was warm. Then it rained all day, and everyone \
                    went inside. ¿Dónde está el gato? 猫はどこですか。";
        let chunks = chunk_text(&t, text, ChunkStrategy::Sentence, 16, 0).unwrap();
        assert!(chunks.len() >= 3, "{chunks:?}");
        for c in &chunks {
            assert!(c.tokens <= 14, "{c:?}");
            // The offsets are characters of the input, and the text is that slice.
            let slice: String = text.chars().skip(c.start).take(c.end - c.start).collect();
            assert_eq!(slice, c.text);
        }
        assert_eq!(chunks[0].text, "The cat sat on the mat. It was warm.");
        // Windows of 10 tokens stepping by 7.
        let w = chunk_text(&t, text, ChunkStrategy::Tokens, 12, 3).unwrap();
        assert!(w.iter().all(|c| c.tokens <= 10));
        assert!(w[1].start < w[0].end, "windows overlap: {w:?}");
        let total = token_spans(&t, text).unwrap().len();
        assert_eq!(
            w.iter().map(|c| c.tokens).sum::<usize>() - 3 * (w.len() - 1),
            total
        );
        assert!(chunk_text(&t, "", ChunkStrategy::Sentence, 64, 0)
            .unwrap()
            .is_empty());
    }
}
