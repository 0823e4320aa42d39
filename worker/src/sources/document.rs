//! A stored file as an item, for the storage types (`files`, `s3`): its media type (from its
//! first bytes, by `infer`, else from its name, by `mime_guess`) and its text (txt, md, csv,
//! json, xml as they are; html as a browser shows it; pdf by `pdf-extract`).

use capibara_shared::domain::connector::types::Item;
use chrono::{DateTime, Utc};
use serde_json::json;
use sha2::{Digest, Sha256};

/// One file of a listing.
pub struct File<'a> {
    /// Path below the listed directory or prefix (`/`-separated).
    pub path: &'a str,
    /// Where it is, for the item's `url` (`s3://bucket/key`); `None` for local files.
    pub url: Option<String>,
    pub modified: DateTime<Utc>,
    pub size: u64,
    /// The file's bytes, when it was read (not past the size limit, and `extract` on).
    pub bytes: Option<&'a [u8]>,
}

/// The item of `file`: id and title its path, `content` its text, `fields.media_type`, and
/// `data` {path, size, media_type, modified}. The content hash covers the path and the text
/// (or, for files without text, the bytes' SHA-256, or size and time when unread), so a file
/// whose content changes is new again.
pub fn item(file: File<'_>) -> Item {
    let media_type = media_type(file.path, file.bytes);
    let text = file.bytes.and_then(|b| text(&media_type, b));
    let digest = match (&text, file.bytes) {
        (Some(_), _) => None,
        (None, Some(b)) => Some(hex::encode(Sha256::digest(b))),
        (None, None) => Some(format!("{}:{}", file.size, file.modified.to_rfc3339())),
    };
    let hash = Item::content_hash(
        Some(file.path),
        file.url.as_deref(),
        None,
        text.as_deref().or(digest.as_deref()),
    );
    Item {
        id: file.path.to_string(),
        hash,
        title: Some(file.path.to_string()),
        url: file.url,
        summary: None,
        content: text,
        published: Some(file.modified),
        updated: Some(file.modified),
        authors: Vec::new(),
        categories: Vec::new(),
        fields: [("media_type".to_string(), vec![media_type.clone()])].into(),
        data: Some(json!({
            "path": file.path,
            "size": file.size,
            "media_type": media_type,
            "modified": file.modified,
            "read": file.bytes.is_some(),
        })),
    }
}

/// The media type: magic numbers first (a PDF named `.txt` is a PDF), then the extension,
/// then UTF-8 text as `text/plain`, else `application/octet-stream`.
pub fn media_type(path: &str, bytes: Option<&[u8]>) -> String {
    if let Some(t) = bytes.and_then(infer::get) {
        return t.mime_type().to_string();
    }
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    // mime_guess has no entry for Markdown's common spellings.
    if matches!(ext.as_deref(), Some("md" | "markdown")) {
        return "text/markdown".into();
    }
    if let Some(m) = mime_guess::from_path(path).first() {
        return m.essence_str().to_string();
    }
    match bytes {
        Some(b) if std::str::from_utf8(b).is_ok() => "text/plain".into(),
        _ => "application/octet-stream".into(),
    }
}

/// The text of a file of `media_type`, if it is a type with text. Invalid UTF-8 is replaced;
/// a PDF that pdf-extract cannot read (or that makes it panic) has no text.
pub fn text(media_type: &str, bytes: &[u8]) -> Option<String> {
    match media_type {
        "text/html" | "application/xhtml+xml" => Some(crate::content::html::html_to_text(
            &String::from_utf8_lossy(bytes),
        )),
        "application/pdf" => pdf_text(bytes),
        t if t.starts_with("text/")
            || matches!(
                t,
                "application/json" | "application/xml" | "application/x-ndjson"
            ) =>
        {
            Some(String::from_utf8_lossy(bytes).into_owned())
        }
        _ => None,
    }
}

fn pdf_text(bytes: &[u8]) -> Option<String> {
    // pdf-extract panics on some malformed documents; a hostile file must not end the worker.
    let out = std::panic::catch_unwind(|| pdf_extract::extract_text_from_mem(bytes)).ok()?;
    out.ok().map(|t| t.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-page PDF with one line of text in Helvetica, its xref offsets computed.
    pub fn pdf(line: &str) -> Vec<u8> {
        let stream = format!("BT /F1 12 Tf 72 712 Td ({line}) Tj ET");
        let objects = [
            "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
            "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
             /Resources << /Font << /F1 5 0 R >> >> >>"
                .to_string(),
            format!(
                "<< /Length {} >>\nstream\n{stream}\nendstream",
                stream.len()
            ),
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_string(),
        ];
        let mut out = b"%PDF-1.4\n".to_vec();
        let mut offsets = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            offsets.push(out.len());
            out.extend(format!("{} 0 obj\n{o}\nendobj\n", i + 1).bytes());
        }
        let xref = out.len();
        out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).bytes());
        for o in offsets {
            out.extend(format!("{o:010} 00000 n \n").bytes());
        }
        out.extend(
            format!(
                "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
                objects.len() + 1
            )
            .bytes(),
        );
        out
    }

    #[test]
    fn types_come_from_the_bytes_before_the_name() {
        let p = pdf("hello");
        assert_eq!(media_type("notes.txt", Some(&p)), "application/pdf");
        assert_eq!(media_type("a.md", Some(b"# x")), "text/markdown");
        assert_eq!(media_type("a.csv", Some(b"a,b")), "text/csv");
        assert_eq!(media_type("a.json", Some(b"{}")), "application/json");
        assert_eq!(media_type("a.html", Some(b"<p>x</p>")), "text/html");
        assert_eq!(media_type("README", Some(b"plain words")), "text/plain");
        assert_eq!(
            media_type("blob", Some(&[0xff, 0xfe, 0x00, 0x81])),
            "application/octet-stream"
        );
        assert_eq!(
            media_type("x.png", Some(b"\x89PNG\r\n\x1a\n....")),
            "image/png"
        );
    }

    #[test]
    fn text_is_extracted_from_html_and_pdf() {
        assert_eq!(
            text(
                "text/html",
                b"<html><head><title>T</title></head><body><p>Hi <b>there</b></p></body></html>"
            )
            .unwrap()
            .trim(),
            "Hi there"
        );
        let t = text("application/pdf", &pdf("Quarterly report 2026")).unwrap();
        assert!(t.contains("Quarterly report 2026"), "{t:?}");
        assert_eq!(text("application/pdf", b"%PDF-1.4 garbage"), None);
        assert_eq!(text("image/png", b"\x89PNG"), None);
    }

    #[test]
    fn a_changed_file_is_a_new_item_and_an_unchanged_one_is_not() {
        let at = Utc::now();
        let f = |bytes: &'static [u8], modified| File {
            path: "a/b.txt",
            url: None,
            modified,
            size: bytes.len() as u64,
            bytes: Some(bytes),
        };
        let a = item(f(b"one", at));
        assert_eq!(a.content.as_deref(), Some("one"));
        assert_eq!(a.fields["media_type"], ["text/plain"]);
        // Touched, same content: the same item.
        assert_eq!(
            a.hash,
            item(f(b"one", at + chrono::Duration::seconds(5))).hash
        );
        assert_ne!(a.hash, item(f(b"two", at)).hash);
        // Binary files differ by their bytes.
        let png = |b: &'static [u8]| {
            item(File {
                path: "i.png",
                url: None,
                modified: at,
                size: 9,
                bytes: Some(b),
            })
        };
        assert_ne!(
            png(b"\x89PNG\r\n\x1a\n1").hash,
            png(b"\x89PNG\r\n\x1a\n2").hash
        );
    }
}
