//! `mail.send`: one message through an SMTP server (docs/mail.md), built and sent with
//! [lettre]. The server's host is resolved once and checked by the outbound guard
//! ([`resolve`]: private addresses refused unless allowed); lettre then connects to the checked
//! address only, while TLS still verifies the certificate against the host name. The password
//! is a namespace secret named by `smtp.password_secret`, read when the message is sent.
//!
//! The server's answer decides the attempt: a 5xx (a refused recipient, a failed login) fails
//! the job; a 4xx, a lost connection or a timeout is retried. Every attempt of a job sends the
//! same `Message-ID`, so a receiver can drop a copy sent twice.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use async_trait::async_trait;
use capibara_shared::{
    domain::{
        job::JobError,
        kinds::{
            input::{self, MailSendInput, SmtpTls},
            output::MailSendOutput,
        },
    },
    outbound::{self, OutboundError},
    store::{self, Store},
};
use lettre::{
    message::{header::ContentType, Mailbox, MultiPart},
    transport::smtp::{
        authentication::Credentials,
        client::{Tls, TlsParameters},
        Error as SmtpError,
    },
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
};

use super::{builtin::to_output, ExecError, Executor, JobContext, Output};
use crate::http::OutboundPolicy;

/// Where `mail.send` and `http.request` read the secrets their inputs name.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// The value of the namespace's secret `name`, if it exists.
    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<String>, String>;

    /// The value of the secret `name` that the input's `field` names: a job fails
    /// (`secret_not_found`) when it does not exist, and retries when the store is unavailable.
    async fn required(
        &self,
        namespace: &str,
        name: &str,
        field: &str,
    ) -> Result<String, ExecError> {
        self.secret(namespace, name)
            .await
            .map_err(|e| retry("store_unavailable", e))?
            .ok_or_else(|| {
                abort(
                    "secret_not_found",
                    format!("secret `{name}` ({field}) does not exist in this namespace"),
                )
            })
    }
}

/// The namespace secrets in Postgres (`/v1/secrets`).
pub struct PgSecrets {
    pub store: Store,
}

#[async_trait]
impl SecretStore for PgSecrets {
    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<String>, String> {
        let mut values = store::secrets::values(&self.store.pool, namespace, &[name.to_string()])
            .await
            .map_err(|e| e.to_string())?;
        Ok(values.remove(name))
    }
}

pub struct MailSend {
    pub secrets: Arc<dyn SecretStore>,
    /// Whether private addresses may be reached (`CAPIBARA_OUTBOUND_ALLOW_PRIVATE`).
    pub policy: OutboundPolicy,
}

/// Seconds a send may take when the input does not say.
const DEFAULT_TIMEOUT_S: u32 = 30;

fn abort(t: &str, m: impl Into<String>) -> ExecError {
    ExecError::Abort(JobError::new(t, m))
}

fn retry(t: &str, m: impl Into<String>) -> ExecError {
    ExecError::Retryable(JobError::new(t, m))
}

/// Resolve `host` once and check every address with the outbound guard: the addresses a mail
/// protocol client may connect to (`host:port`). Shared by `mail.send` and the `imap` type.
pub async fn resolve(
    host: &str,
    port: u16,
    allow_private: bool,
) -> Result<Vec<SocketAddr>, OutboundError> {
    // The guard reads hosts from URLs; an http URL parses the host the way a resolver reads it
    // (IDNA names, IPv4 literals in every notation).
    let url = outbound::parse_url(&format!("http://{host}:{port}/"))?;
    let mut addrs = outbound::resolve(&url, allow_private).await?;
    for a in &mut addrs {
        a.set_port(port);
    }
    Ok(addrs)
}

/// An outbound refusal as what the job should do next.
fn resolve_error(e: OutboundError) -> ExecError {
    match e {
        OutboundError::Forbidden { .. } => abort("forbidden_address", e.to_string()),
        OutboundError::InvalidUrl(m) => abort("invalid_input", format!("smtp.host: {m}")),
        OutboundError::Resolve(_) => retry("connect_failed", e.to_string()),
    }
}

/// What the SMTP client's failure means for the job.
fn smtp_error(e: &SmtpError) -> ExecError {
    let said = e.to_string();
    if e.is_permanent() {
        abort(
            "smtp_rejected",
            format!("the SMTP server refused the message: {said}"),
        )
    } else if e.is_transient() {
        retry(
            "smtp_deferred",
            format!("the SMTP server deferred the message: {said}"),
        )
    } else if e.is_timeout() {
        retry(
            "timeout",
            format!("the SMTP server did not answer in time: {said}"),
        )
    } else if e.is_tls() {
        abort("tls_failed", said)
    } else if e.is_client() {
        abort("smtp_unsupported", said)
    } else {
        retry("connect_failed", said)
    }
}

fn mailbox(field: &str, s: &str) -> Result<Mailbox, ExecError> {
    s.parse().map_err(|e| {
        abort(
            "invalid_input",
            format!("{field}: not an email address ({e})"),
        )
    })
}

/// The message as lettre builds it, and the bare addresses of its recipients.
fn message(input: &MailSendInput, message_id: &str) -> Result<(Message, Vec<String>), ExecError> {
    let mut b = Message::builder()
        .from(mailbox("from", &input.from)?)
        .subject(input.subject.clone())
        .message_id(Some(message_id.to_string()));
    if let Some(r) = &input.reply_to {
        b = b.reply_to(mailbox("reply_to", r)?);
    }
    let mut accepted = Vec::new();
    for (i, a) in input.to.iter().enumerate() {
        let m = mailbox(&format!("to[{i}]"), a)?;
        accepted.push(m.email.to_string());
        b = b.to(m);
    }
    for (i, a) in input.cc.iter().flatten().enumerate() {
        let m = mailbox(&format!("cc[{i}]"), a)?;
        accepted.push(m.email.to_string());
        b = b.cc(m);
    }
    for (i, a) in input.bcc.iter().flatten().enumerate() {
        let m = mailbox(&format!("bcc[{i}]"), a)?;
        accepted.push(m.email.to_string());
        b = b.bcc(m);
    }
    let built = match (&input.text, &input.html) {
        (Some(t), Some(h)) => b.multipart(MultiPart::alternative_plain_html(t.clone(), h.clone())),
        (None, Some(h)) => b.header(ContentType::TEXT_HTML).body(h.clone()),
        (Some(t), None) => b.header(ContentType::TEXT_PLAIN).body(t.clone()),
        (None, None) => return Err(abort("invalid_input", "text: is required without html")),
    };
    let message = built.map_err(|e| abort("invalid_input", e.to_string()))?;
    Ok((message, accepted))
}

impl MailSend {
    async fn password(
        &self,
        namespace: &str,
        input: &MailSendInput,
    ) -> Result<Option<Credentials>, ExecError> {
        let (Some(user), Some(name)) = (&input.smtp.username, &input.smtp.password_secret) else {
            return Ok(None);
        };
        let value = self
            .secrets
            .required(namespace, name, "smtp.password_secret")
            .await?;
        Ok(Some(Credentials::new(user.clone(), value)))
    }

    async fn send(
        &self,
        input: &MailSendInput,
        credentials: Option<Credentials>,
        message: &Message,
        per_command: Duration,
    ) -> Result<String, ExecError> {
        let port = u16::try_from(input.smtp.port)
            .map_err(|_| abort("invalid_input", "smtp.port: must be from 1 to 65535"))?;
        let addrs = resolve(&input.smtp.host, port, self.policy.allow_private)
            .await
            .map_err(resolve_error)?;
        let tls = |host: &str| {
            TlsParameters::new(host.to_string()).map_err(|e| abort("tls_failed", e.to_string()))
        };
        let tls = match input.smtp.tls {
            SmtpTls::None => Tls::None,
            SmtpTls::Starttls => Tls::Required(tls(&input.smtp.host)?),
            SmtpTls::Tls => Tls::Wrapper(tls(&input.smtp.host)?),
        };
        let mut last = None;
        for addr in addrs {
            // The checked address, never the name again: no second lookup to rebind.
            let mut builder =
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(addr.ip().to_string())
                    .port(addr.port())
                    .tls(tls.clone())
                    .timeout(Some(per_command));
            if let Some(c) = &credentials {
                builder = builder.credentials(c.clone());
            }
            match builder.build().send(message.clone()).await {
                Ok(r) => {
                    let text = r.message().collect::<Vec<_>>().join(" ");
                    return Ok(format!("{} {text}", r.code()));
                }
                // Another address may answer where this one did not connect.
                Err(e) if !e.is_response() && e.status().is_none() && !e.is_client() => {
                    last = Some(e);
                }
                Err(e) => return Err(smtp_error(&e)),
            }
        }
        Err(last.map_or_else(
            || retry("connect_failed", "the SMTP host has no addresses"),
            |e| smtp_error(&e),
        ))
    }
}

#[async_trait]
impl Executor for MailSend {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input = input::parse_mail_send(&ctx.input)
            .map_err(|e| abort("invalid_input", format!("{}: {}", e.field, e.message)))?;
        let domain = mailbox("from", &input.from)?.email.domain().to_string();
        // One id per job, so a retried send is recognisably the same message.
        let message_id = format!("<{}@{domain}>", ctx.job_id);
        let (message, accepted) = message(&input, &message_id)?;
        let credentials = self.password(&ctx.job.namespace, &input).await?;
        let timeout = Duration::from_secs(input.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S).into());
        let started = std::time::Instant::now();
        let sent = tokio::select! {
            r = tokio::time::timeout(timeout, self.send(&input, credentials, &message, timeout)) => r,
            () = ctx.cancel.cancelled() => {
                return Err(abort("canceled", "the send was canceled"));
            }
        };
        let response = sent.map_err(|_| {
            retry(
                "timeout",
                format!("the SMTP exchange took longer than {}s", timeout.as_secs()),
            )
        })??;
        Ok(Output {
            output: to_output(MailSendOutput {
                message_id,
                accepted,
                response,
                duration_ms: (started.elapsed().as_secs_f64() * 1e5).round() / 100.0,
            }),
            ..Default::default()
        })
    }

    /// A message is an effect outside Capibara: claimed before it starts, never sent twice at
    /// once.
    fn repeatable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input(extra: serde_json::Value) -> MailSendInput {
        let mut v = json!({"from": "Capibara <bot@example.com>", "to": ["a@example.org"],
                           "subject": "Hi", "smtp": {"host": "smtp.example.com", "port": 587,
                           "tls": "starttls"}});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        input::parse_mail_send(&v).unwrap()
    }

    fn formatted(m: &Message) -> String {
        String::from_utf8(m.formatted()).unwrap()
    }

    #[test]
    fn text_html_and_both_make_the_right_bodies_and_bcc_stays_out_of_the_headers() {
        let (m, acc) = message(
            &input(json!({"text": "plain", "cc": ["C <c@example.org>"], "bcc": ["b@example.org"]})),
            "<1@example.com>",
        )
        .unwrap();
        let s = formatted(&m);
        assert!(s.contains("Content-Type: text/plain"), "{s}");
        assert!(s.contains("Message-ID: <1@example.com>"), "{s}");
        assert!(!s.to_lowercase().contains("bcc"), "{s}");
        assert_eq!(acc, ["a@example.org", "c@example.org", "b@example.org"]);
        assert_eq!(m.envelope().to().len(), 3);

        let (m, _) = message(&input(json!({"html": "<p>x</p>"})), "<2@x>").unwrap();
        assert!(formatted(&m).contains("Content-Type: text/html"));
        let (m, _) = message(&input(json!({"html": "<p>x</p>", "text": "x"})), "<3@x>").unwrap();
        assert!(formatted(&m).contains("multipart/alternative"));
    }

    #[test]
    fn inputs_are_checked_field_by_field() {
        let field = |v: serde_json::Value| input::check_mail_send(&v).unwrap_err().field;
        let base = json!({"from": "bot@example.com", "to": ["a@example.org"], "subject": "s",
                          "text": "t", "smtp": {"host": "smtp.example.com", "port": 25, "tls": "none"}});
        assert!(input::check_mail_send(&base).is_ok());
        let with = |path: &[&str], value: serde_json::Value| {
            let mut v = base.clone();
            let mut at = &mut v;
            for p in &path[..path.len() - 1] {
                at = &mut at[*p];
            }
            at[path[path.len() - 1]] = value;
            v
        };
        assert_eq!(field(with(&["to"], json!(["nope"]))), "to[0]");
        assert_eq!(field(with(&["to"], json!([]))), "to");
        assert_eq!(field(with(&["from"], json!("not an address"))), "from");
        assert_eq!(field(with(&["smtp", "port"], json!(0))), "smtp.port");
        assert_eq!(field(with(&["smtp", "tls"], json!("ssl"))), "smtp.tls");
        assert_eq!(field(with(&["smtp", "host"], json!("a b"))), "smtp.host");
        assert_eq!(
            field(with(&["smtp", "username"], json!("u"))),
            "smtp.password_secret"
        );
        let mut none = base.clone();
        none.as_object_mut().unwrap().remove("text");
        assert_eq!(field(none), "text");
    }
}
