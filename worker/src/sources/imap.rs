//! `imap`: the messages of one folder of an IMAP mailbox, read with async-imap (TLS by rustls,
//! STARTTLS, or plain) and parsed with mailparse. The host is resolved once and checked by the
//! outbound guard; the connection goes to the checked address only, while TLS verifies the
//! certificate against the host name.
//!
//! The folder is opened read-only (`EXAMINE`) and bodies are read with `BODY.PEEK[]`, so a
//! fetch never marks a message seen. New messages are those with a UID above the cursor's
//! `last_uid` (and, with `unseen_only`, not `\Seen`); a folder whose UIDVALIDITY changed is
//! listed from the start again. Attachments are handed to the executor, which stores those of
//! new items as artifacts of the fetch.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use async_imap::{error::Error as ImapError, Client, Session};
use capibara_shared::domain::connector::{
    imap::{ImapConfig, ImapTls, DEFAULT_MAX_MESSAGES},
    types::Item,
};
use futures::TryStreamExt;
use mailparse::{DispositionType, MailAddr, MailHeaderMap, ParsedMail};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{
    client::TlsStream,
    rustls::{self, pki_types::ServerName},
    TlsConnector,
};

use super::{Attachment, Listing, Request, SourceError};
use crate::{content::html::html_to_text, fetch::GetError, http::HttpError};

/// The connection: plain TCP or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Plain(_) => "Stream::Plain",
            Stream::Tls(_) => "Stream::Tls",
        })
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn connect_error(m: impl fmt::Display) -> SourceError {
    SourceError::Get(GetError::Http(HttpError::Connect(m.to_string())))
}

/// A failure of the conversation after the connection was made.
fn protocol(what: &str, e: ImapError) -> SourceError {
    match e {
        ImapError::Io(e) => connect_error(format!("{what}: {e}")),
        ImapError::ConnectionLost => connect_error(format!("{what}: the connection was lost")),
        e => SourceError::Malformed(format!("{what}: {e}")),
    }
}

/// TLS over `tcp`, verified against `host` with the webpki roots.
async fn tls(tcp: TcpStream, host: &str) -> Result<Stream, SourceError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| connect_error(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| SourceError::Config(format!("host: {e}")))?;
    let stream = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| connect_error(format!("TLS with {host}: {e}")))?;
    Ok(Stream::Tls(Box::new(stream)))
}

/// Connect to the checked address, secure the connection as configured, log in.
async fn open(
    config: &ImapConfig,
    password: &str,
    allow_private: bool,
) -> Result<Session<Stream>, SourceError> {
    let port = u16::try_from(config.port)
        .map_err(|_| SourceError::Config("port: must be from 1 to 65535".into()))?;
    let addrs = crate::executors::mail::resolve(&config.host, port, allow_private)
        .await
        .map_err(|e| SourceError::Get(GetError::Http(HttpError::from(e))))?;
    let mut tcp = None;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(format!("{addr}: {e}")),
        }
    }
    let tcp = tcp.ok_or_else(|| {
        connect_error(format!(
            "connecting to {}:{port}: {}",
            config.host,
            last.unwrap_or_else(|| "no addresses".into())
        ))
    })?;
    let stream = match config.tls {
        ImapTls::Tls => tls(tcp, &config.host).await?,
        ImapTls::None | ImapTls::Starttls => Stream::Plain(tcp),
    };
    let mut client = Client::new(stream);
    client
        .read_response()
        .await
        .map_err(|e| connect_error(format!("reading the greeting: {e}")))?
        .ok_or_else(|| connect_error("the server closed the connection before its greeting"))?;
    if config.tls == ImapTls::Starttls {
        client
            .run_command_and_check_ok("STARTTLS", None)
            .await
            .map_err(|e| protocol("STARTTLS", e))?;
        let Stream::Plain(tcp) = client.into_inner() else {
            unreachable!("STARTTLS runs on a plain connection")
        };
        client = Client::new(tls(tcp, &config.host).await?);
    }
    client
        .login(&config.username, password)
        .await
        .map_err(|(e, _)| match e {
            ImapError::No(m) | ImapError::Bad(m) => SourceError::Denied(format!(
                "the IMAP server refused the login of `{}`: {m}",
                config.username
            )),
            e => protocol("LOGIN", e),
        })
}

/// The cursor a listing starts from: `(uidvalidity, last_uid)`.
fn cursor_of(cursor: Option<&Value>) -> (Option<u32>, u32) {
    let n = |k: &str| {
        cursor
            .and_then(|c| c.get(k))
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    };
    (n("uidvalidity"), n("last_uid").unwrap_or(0))
}

pub async fn list(req: Request<'_>) -> Result<Listing, SourceError> {
    let config: ImapConfig = serde_json::from_value(req.config.clone())
        .map_err(|e| SourceError::Config(e.to_string()))?;
    let password = req.secrets.get("auth.password").ok_or_else(|| {
        SourceError::Config(
            "an imap connector needs its password as a secret at `auth.password`".into(),
        )
    })?;
    let policy = super::policy(req.policy, config.max_bytes, config.timeout_s);
    let work = fetch(&config, password, req.cursor, &policy);
    tokio::select! {
        r = tokio::time::timeout(policy.timeout, work) => {
            r.map_err(|_| SourceError::Get(GetError::Http(HttpError::Timeout)))?
        }
        () = req.cancel.cancelled() => Err(SourceError::Get(GetError::Canceled)),
    }
}

async fn fetch(
    config: &ImapConfig,
    password: &str,
    cursor: Option<&Value>,
    policy: &crate::http::OutboundPolicy,
) -> Result<Listing, SourceError> {
    let mut session = open(config, password, policy.allow_private).await?;
    let mailbox = session.examine(&config.folder).await.map_err(|e| match e {
        ImapError::No(m) => SourceError::NotFound(format!(
            "the IMAP server cannot open folder `{}`: {m}",
            config.folder
        )),
        e => protocol("EXAMINE", e),
    })?;
    let uidvalidity = mailbox.uid_validity.unwrap_or(0);
    let (was, mut last_uid) = cursor_of(cursor);
    if was != Some(uidvalidity) {
        // A new folder, or one rebuilt: its UIDs start over.
        last_uid = 0;
    }
    // `n:*` always matches the highest UID, even below `n`: keep only those above the cursor.
    let query = format!(
        "UID {}:*{}",
        last_uid.saturating_add(1),
        if config.unseen_only { " UNSEEN" } else { "" }
    );
    let uids: BTreeSet<u32> = session
        .uid_search(&query)
        .await
        .map_err(|e| protocol("UID SEARCH", e))?
        .into_iter()
        .filter(|u| *u > last_uid)
        .collect();
    let max = config.max_messages.unwrap_or(DEFAULT_MAX_MESSAGES) as usize;
    let wanted: Vec<u32> = uids.into_iter().take(max).collect();

    // Sizes first: read messages (oldest first) while they fit in max_bytes.
    let mut sizes = BTreeMap::new();
    if !wanted.is_empty() {
        let set = uid_set(&wanted);
        let fetched: Vec<_> = session
            .uid_fetch(&set, "(UID RFC822.SIZE)")
            .await
            .map_err(|e| protocol("UID FETCH", e))?
            .try_collect()
            .await
            .map_err(|e| protocol("UID FETCH", e))?;
        for f in fetched {
            if let (Some(uid), Some(size)) = (f.uid, f.size) {
                sizes.insert(uid, u64::from(size));
            }
        }
    }
    let budget = policy.max_response_bytes as u64;
    let mut total = 0u64;
    let mut take = Vec::new();
    for uid in wanted {
        let size = sizes.get(&uid).copied().unwrap_or(0);
        if total + size > budget {
            if take.is_empty() {
                return Err(SourceError::Get(GetError::TooLarge(
                    policy.max_response_bytes,
                )));
            }
            break;
        }
        total += size;
        take.push(uid);
    }

    let mut listing = Listing {
        cursor: json!({"uidvalidity": uidvalidity, "last_uid": last_uid}),
        ..Listing::default()
    };
    if take.is_empty() {
        let _ = session.logout().await;
        return Ok(listing);
    }
    let fetched: Vec<_> = session
        .uid_fetch(uid_set(&take), "(UID BODY.PEEK[])")
        .await
        .map_err(|e| protocol("UID FETCH", e))?
        .try_collect()
        .await
        .map_err(|e| protocol("UID FETCH", e))?;
    let _ = session.logout().await;
    let mut bodies: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for f in &fetched {
        if let (Some(uid), Some(body)) = (f.uid, f.body()) {
            if take.binary_search(&uid).is_ok() {
                bodies.insert(uid, body.to_vec());
            }
        }
    }
    let mut bytes = 0u64;
    for (uid, raw) in &bodies {
        bytes += raw.len() as u64;
        if bytes > budget {
            return Err(SourceError::Get(GetError::TooLarge(
                policy.max_response_bytes,
            )));
        }
        let (item, attachments) = message(uidvalidity, *uid, raw)?;
        listing.items.push(item);
        listing.attachments.extend(attachments);
    }
    listing.bytes = bytes;
    let newest = take.last().copied().unwrap_or(last_uid);
    listing.cursor = json!({"uidvalidity": uidvalidity, "last_uid": newest});
    Ok(listing)
}

/// `1,3,5:7` for the UIDs (ascending).
fn uid_set(uids: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            i += 1;
            end = uids[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}:{end}")
        });
        i += 1;
    }
    out.join(",")
}

/// An attachment's artifact name: `<uidvalidity>-<uid>-<n>-<file name>`, in the characters an
/// artifact name allows (others become `_`), at most 128 of them.
fn artifact_name(uidvalidity: u32, uid: u32, n: usize, filename: &str) -> String {
    let clean: String = filename
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut name = format!("{uidvalidity}-{uid}-{n}-{clean}");
    name.truncate(128);
    name
}

/// The text of a message: its first text/plain part that is not an attachment, else its first
/// text/html part as text.
fn body_text(mail: &ParsedMail<'_>) -> Option<String> {
    let parts: Vec<&ParsedMail<'_>> = mail
        .parts()
        .filter(|p| p.subparts.is_empty())
        .filter(|p| p.get_content_disposition().disposition != DispositionType::Attachment)
        .collect();
    let of = |mime: &str| {
        parts
            .iter()
            .find(|p| p.ctype.mimetype.eq_ignore_ascii_case(mime))
            .and_then(|p| p.get_body().ok())
    };
    of("text/plain").or_else(|| of("text/html").map(|h| html_to_text(&h)))
}

/// Values of header `name`, decoded (RFC 2047).
fn header(mail: &ParsedMail<'_>, name: &str) -> Option<String> {
    mail.headers
        .get_first_value(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The addresses of an address header, each as `Name <a@b>` or `a@b`.
fn addresses(mail: &ParsedMail<'_>, name: &str) -> Vec<String> {
    let Some(h) = mail.headers.get_first_header(name) else {
        return Vec::new();
    };
    match mailparse::addrparse_header(h) {
        Ok(list) => list
            .iter()
            .flat_map(|a| match a {
                MailAddr::Single(s) => vec![s.to_string()],
                MailAddr::Group(g) => g.addrs.iter().map(ToString::to_string).collect(),
            })
            .collect(),
        Err(_) => vec![h.get_value().trim().to_string()],
    }
}

/// One message as an item, and its attachments.
fn message(uidvalidity: u32, uid: u32, raw: &[u8]) -> Result<(Item, Vec<Attachment>), SourceError> {
    let mail = mailparse::parse_mail(raw)
        .map_err(|e| SourceError::Malformed(format!("message UID {uid}: {e}")))?;
    let id = format!("{uidvalidity}:{uid}");
    let subject = header(&mail, "Subject");
    let message_id = header(&mail, "Message-ID");
    let from = addresses(&mail, "From");
    let published = header(&mail, "Date")
        .and_then(|d| mailparse::dateparse(&d).ok())
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0));
    let content = body_text(&mail);

    let mut attachments = Vec::new();
    let mut names = Vec::new();
    let mut artifacts = Vec::new();
    for part in mail.parts().filter(|p| p.subparts.is_empty()) {
        let disposition = part.get_content_disposition();
        let filename = disposition
            .params
            .get("filename")
            .or_else(|| part.ctype.params.get("name"))
            .cloned();
        let is_attachment = disposition.disposition == DispositionType::Attachment
            || (filename.is_some() && !part.ctype.mimetype.starts_with("text/"));
        if !is_attachment {
            continue;
        }
        let filename = filename.unwrap_or_else(|| format!("attachment-{}", names.len() + 1));
        let bytes = part
            .get_body_raw()
            .map_err(|e| SourceError::Malformed(format!("message UID {uid}, {filename}: {e}")))?;
        let name = artifact_name(uidvalidity, uid, names.len() + 1, &filename);
        attachments.push(Attachment {
            item: id.clone(),
            name: name.clone(),
            media_type: part.ctype.mimetype.clone(),
            bytes,
        });
        names.push(filename);
        artifacts.push(name);
    }

    let mut fields = BTreeMap::new();
    for (k, v) in [
        ("to", addresses(&mail, "To")),
        ("cc", addresses(&mail, "Cc")),
        ("message_id", message_id.clone().into_iter().collect()),
        ("attachments", names),
        ("attachment_artifacts", artifacts),
    ] {
        if !v.is_empty() {
            fields.insert(k.to_string(), v);
        }
    }
    let mut headers = serde_json::Map::new();
    for h in &mail.headers {
        let (k, v) = (h.get_key(), Value::String(h.get_value()));
        match headers.get_mut(&k) {
            Some(Value::Array(a)) => a.push(v),
            Some(one) => *one = Value::Array(vec![one.take(), v]),
            None => {
                headers.insert(k, v);
            }
        }
    }
    let hash = Item::content_hash(
        subject.as_deref(),
        Some(message_id.as_deref().unwrap_or(&id)),
        from.first().map(String::as_str),
        content.as_deref(),
    );
    let item = Item {
        id,
        hash,
        title: subject,
        url: None,
        summary: None,
        content,
        published,
        updated: None,
        authors: from,
        categories: Vec::new(),
        fields,
        data: Some(json!({"uid": uid, "uidvalidity": uidvalidity, "headers": headers})),
    };
    Ok((item, attachments))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_sets_compress_runs() {
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(uid_set(&[4]), "4");
    }

    #[test]
    fn a_message_becomes_an_item_with_its_attachments() {
        let raw = concat!(
            "From: Ana <ana@example.org>\r\n",
            "To: bot@capibara.test, Bo <bo@example.org>\r\n",
            "Subject: =?utf-8?q?Caf=C3=A9_report?=\r\n",
            "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n",
            "Message-ID: <r1@example.org>\r\n",
            "MIME-Version: 1.0\r\n",
            "Content-Type: multipart/mixed; boundary=\"b\"\r\n",
            "\r\n",
            "--b\r\n",
            "Content-Type: text/html; charset=utf-8\r\n",
            "\r\n",
            "<p>Hello <b>there</b></p>\r\n",
            "--b\r\n",
            "Content-Type: application/octet-stream; name=\"data 1.bin\"\r\n",
            "Content-Disposition: attachment; filename=\"data 1.bin\"\r\n",
            "Content-Transfer-Encoding: base64\r\n",
            "\r\n",
            "AAEC/w==\r\n",
            "--b--\r\n",
        );
        let (item, atts) = message(7, 42, raw.as_bytes()).unwrap();
        assert_eq!(item.id, "7:42");
        assert_eq!(item.title.as_deref(), Some("Café report"));
        assert_eq!(item.content.as_deref().map(str::trim), Some("Hello there"));
        assert_eq!(item.authors, ["\"Ana\" <ana@example.org>"]);
        assert_eq!(item.fields["to"].len(), 2);
        assert_eq!(item.fields["attachments"], ["data 1.bin"]);
        assert_eq!(item.fields["attachment_artifacts"], ["7-42-1-data_1.bin"]);
        assert_eq!(atts.len(), 1);
        assert_eq!(atts[0].bytes, [0, 1, 2, 255]);
        assert_eq!(atts[0].item, "7:42");
        assert_eq!(
            item.published.unwrap().to_rfc3339(),
            "2026-12-01T10:00:00+00:00"
        );
    }
}
