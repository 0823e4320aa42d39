//! Mail (docs/mail.md): `mail.send` hands a message to a real SMTP server — aiosmtpd, from PyPI
//! (deploy/test.sh installs it into target/capibara-test/mail) — on loopback, logging in with a
//! password kept in a namespace secret; the server's answers decide the job.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use capibara_tests::{find_free_port, Api, TestEnv};
use serde_json::{json, Value};

/// A Python program of the mail venv, killed on drop.
struct Server {
    child: Child,
    port: u16,
    /// Where the SMTP server writes what it received (one JSON file per message).
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The Python of the venv deploy/test.sh makes with aiosmtpd and pymap.
fn python() -> PathBuf {
    let path = std::env::var_os("CAPIBARA_TEST_MAIL_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/capibara-test/mail")
        })
        .join("bin/python");
    assert!(
        path.exists(),
        "{} is missing: deploy/test.sh installs aiosmtpd and pymap from PyPI there",
        path.display()
    );
    path
}

/// An SMTP server (aiosmtpd's, the protocol and AUTH its own) that requires a login
/// (`capibara` / `SMTP_PASSWORD`), refuses `nobody@…` with 550 and defers `busy@…` with 451,
/// and writes every message it takes to `<dir>/<n>.json`.
const SMTP_SERVER: &str = r#"
import asyncio, json, os, sys
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

port, out, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

def authenticate(server, session, envelope, mechanism, data):
    ok = (isinstance(data, LoginPassword) and data.login.decode() == user
          and data.password.decode() == password)
    return AuthResult(success=ok, handled=False, auth_data=data)

class Handler:
    async def handle_RCPT(self, server, session, envelope, address, options):
        if address.startswith("nobody@"):
            return "550 5.1.1 <%s>: no such user here" % address
        if address.startswith("busy@"):
            return "451 4.3.0 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        n = len([f for f in os.listdir(out) if f.endswith(".json")])
        record = {"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos,
                  "login": session.login_data.decode() if session.login_data else None,
                  "data": envelope.content.decode("utf-8", "replace")}
        path = os.path.join(out, "%d.json" % n)
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.rename(path + ".tmp", path)
        return "250 2.0.0 Ok: queued as Q%d" % n

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Handler(), hostname="mail.test", authenticator=authenticate,
                     auth_required=True, auth_require_tls=False),
        "127.0.0.1", port)
    await server.serve_forever()

asyncio.run(main())
"#;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("capibara-{name}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Wait until something listens on `port` (30 s at most).
async fn listening(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the mail server exited: {status}");
        }
        assert!(Instant::now() < deadline, "port {port} did not open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_smtp(password: &str) -> Server {
    let dir = scratch("smtp");
    let script = dir.join("server.py");
    std::fs::write(&script, SMTP_SERVER).unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let port = find_free_port();
    let mut child = Command::new(python())
        .arg(&script)
        .args([
            &port.to_string(),
            out.to_str().unwrap(),
            "capibara",
            password,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the SMTP server");
    listening(port, &mut child).await;
    Server { child, port, dir }
}

/// The messages the SMTP server took, in order.
fn received(dir: &Path) -> Vec<Value> {
    let out = dir.join("out");
    (0..)
        .map(|n| out.join(format!("{n}.json")))
        .take_while(|p| p.exists())
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect()
}

async fn env_allowing_loopback() -> TestEnv {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()));
    env
}

async fn put_secret(api: &Api, name: &str, value: &str) {
    let r = api
        .send(
            api.http
                .put(api.url(&format!("/v1/secrets/{name}")))
                .json(&json!({ "value": value })),
        )
        .await;
    assert!(r.status < 300, "{r:?}");
}

/// The value of header `name` in a raw message (unfolded), if present.
fn header(message: &str, name: &str) -> Option<String> {
    let head = message.split("\r\n\r\n").next().unwrap_or_default();
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    unfolded.split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

#[tokio::test]
async fn mail_send_delivers_through_smtp_and_the_servers_answers_decide_the_job() {
    let env = env_allowing_loopback().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let smtp = start_smtp("s3cret-smtp-pw").await;
    put_secret(&api, "SMTP_PASSWORD", "s3cret-smtp-pw").await;
    let server = json!({"host": "127.0.0.1", "port": smtp.port, "tls": "none",
                        "username": "capibara", "password_secret": "SMTP_PASSWORD"});
    let mail = |extra: Value| {
        let mut input = json!({
            "from": "Capibara Bot <bot@capibara.test>",
            "to": ["Ana <ana@example.org>"],
            "subject": "Digest: 3 new posts",
            "text": "Three new posts today.",
            "smtp": server.clone(),
        });
        input
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"kind": "mail.send", "input": input, "max_attempts": 2,
               "backoff": {"initial_ms": 100, "max_ms": 200}})
    };

    // Bad inputs are 422 problems naming the field.
    for (extra, field) in [
        (json!({"to": ["not an address"]}), "input.to[0]"),
        (json!({"to": []}), "input.to"),
        (
            json!({"smtp": {"host": "127.0.0.1", "port": 70000, "tls": "none"}}),
            "input.smtp.port",
        ),
        (
            json!({"smtp": {"host": "127.0.0.1", "port": 25, "tls": "ssl"}}),
            "input.smtp.tls",
        ),
        (
            json!({"smtp": {"host": "127.0.0.1", "port": 25, "tls": "none", "username": "u"}}),
            "input.smtp.password_secret",
        ),
        (json!({"text": null, "subject": "s"}), "input.text"),
    ] {
        let mut body = mail(extra);
        if body["input"]["text"].is_null() {
            body["input"].as_object_mut().unwrap().remove("text");
        }
        let r = api.submit(body).await;
        assert_eq!(r.status, 422, "{r:?}");
        assert_eq!(r.body["errors"][0]["field"], field, "{r:?}");
    }

    // A message with text and HTML, a copy and a blind copy, sent with the secret's password.
    let id = api
        .submit_id(mail(json!({
            "html": "<p>Three <b>new</b> posts today.</p>",
            "cc": ["bo@example.org"],
            "bcc": ["hidden@example.org"],
            "reply_to": "team@capibara.test",
        })))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let out = &job["output"];
    assert_eq!(
        out["accepted"],
        json!(["ana@example.org", "bo@example.org", "hidden@example.org"])
    );
    assert!(
        out["response"].as_str().unwrap().starts_with("250"),
        "{out}"
    );
    let got = received(&smtp.dir);
    assert_eq!(got.len(), 1, "{got:?}");
    let m = &got[0];
    assert_eq!(
        m["login"], "capibara",
        "logged in with the secret's password"
    );
    assert_eq!(m["mail_from"], "bot@capibara.test");
    assert_eq!(
        m["rcpt_tos"],
        json!(["ana@example.org", "bo@example.org", "hidden@example.org"])
    );
    let data = m["data"].as_str().unwrap();
    assert_eq!(
        header(data, "Subject").as_deref(),
        Some("Digest: 3 new posts")
    );
    assert_eq!(
        header(data, "From").as_deref(),
        Some("\"Capibara Bot\" <bot@capibara.test>")
    );
    assert_eq!(header(data, "To").as_deref(), Some("Ana <ana@example.org>"));
    assert_eq!(header(data, "Cc").as_deref(), Some("bo@example.org"));
    assert_eq!(
        header(data, "Bcc"),
        None,
        "a blind copy stays out of the headers"
    );
    assert_eq!(
        header(data, "Reply-To").as_deref(),
        Some("team@capibara.test")
    );
    assert_eq!(
        header(data, "Message-ID"),
        out["message_id"].as_str().map(str::to_string)
    );
    assert_eq!(
        out["message_id"],
        format!("<{id}@capibara.test>"),
        "one Message-ID per job"
    );
    assert!(
        header(data, "Content-Type")
            .unwrap()
            .starts_with("multipart/alternative"),
        "{data}"
    );
    assert!(data.contains("Three new posts today."), "{data}");
    assert!(
        data.contains("<p>Three <b>new</b> posts today.</p>"),
        "{data}"
    );

    // A permanent refusal (550) fails the job at once with the server's words.
    let id = api
        .submit_id(mail(json!({"to": ["nobody@example.org"]})))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(
        (job["status"].as_str(), job["attempt"].as_u64()),
        (Some("failed"), Some(1)),
        "{job}"
    );
    assert_eq!(job["error"]["type"], "smtp_rejected", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("550") && message.contains("no such user here"),
        "{message}"
    );

    // A wrong password is a permanent refusal too (535).
    put_secret(&api, "SMTP_WRONG", "not-the-password").await;
    let mut wrong = server.clone();
    wrong["password_secret"] = json!("SMTP_WRONG");
    let id = api.submit_id(mail(json!({"smtp": wrong}))).await;
    let job = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(
        (job["status"].as_str(), job["error"]["type"].as_str()),
        (Some("failed"), Some("smtp_rejected")),
        "{job}"
    );
    assert!(
        job["error"]["message"].as_str().unwrap().contains("535"),
        "{job}"
    );

    // A missing secret says which.
    let mut missing = server.clone();
    missing["password_secret"] = json!("NO_SUCH_SECRET");
    let id = api.submit_id(mail(json!({"smtp": missing}))).await;
    let job = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(job["error"]["type"], "secret_not_found", "{job}");

    // A temporary refusal (451) is retried, then fails when the attempts are spent.
    let id = api
        .submit_id(mail(json!({"to": ["busy@example.org"]})))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(
        (
            job["status"].as_str(),
            job["attempt"].as_u64(),
            job["error"]["type"].as_str()
        ),
        (Some("failed"), Some(2), Some("smtp_deferred")),
        "{job}"
    );
    assert_eq!(received(&smtp.dir).len(), 1, "nothing else was delivered");
}

#[tokio::test]
async fn mail_send_refuses_private_addresses_unless_allowed() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let smtp = start_smtp("pw").await;
    let id = api
        .submit_id(json!({"kind": "mail.send", "input": {
            "from": "bot@capibara.test", "to": ["ana@example.org"], "subject": "s", "text": "t",
            "smtp": {"host": "127.0.0.1", "port": smtp.port, "tls": "none"}}}))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(
        (job["status"].as_str(), job["error"]["type"].as_str()),
        (Some("failed"), Some("forbidden_address")),
        "{job}"
    );
    assert!(received(&smtp.dir).is_empty());
}

/// Appends a message (stdin) to a folder of the IMAP server with Python's own imaplib (an
/// independent client): `append.py PORT USER PASSWORD FOLDER FLAGS`.
const IMAP_APPEND: &str = r#"
import imaplib, sys
port, user, password, folder, flags = sys.argv[1:6]
c = imaplib.IMAP4("127.0.0.1", int(port))
c.login(user, password)
typ, data = c.append(folder, flags or None, None, sys.stdin.buffer.read())
assert typ == "OK", data
c.logout()
"#;

/// Counts the messages of a folder that are not `\Seen`: `unseen.py PORT USER PASSWORD FOLDER`.
const IMAP_UNSEEN: &str = r#"
import imaplib, sys
port, user, password, folder = sys.argv[1:5]
c = imaplib.IMAP4("127.0.0.1", int(port))
c.login(user, password)
c.select(folder, readonly=True)
typ, data = c.uid("SEARCH", None, "UNSEEN")
print(len(data[0].split()))
c.logout()
"#;

/// An IMAP server (pymap's in-memory backend) with one user, `capibara` / `imap-pw`.
async fn start_imap() -> Server {
    let dir = scratch("imap");
    std::fs::write(dir.join("append.py"), IMAP_APPEND).unwrap();
    std::fs::write(dir.join("unseen.py"), IMAP_UNSEEN).unwrap();
    let port = find_free_port();
    let pymap = python().with_file_name("pymap");
    let mut child = Command::new(pymap)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--no-tls",
        ])
        .args([
            "dict",
            "--demo-user",
            "capibara",
            "--demo-password",
            "imap-pw",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting pymap");
    listening(port, &mut child).await;
    Server { child, port, dir }
}

fn imap_script(server: &Server, script: &str, args: &[&str], stdin: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new(python())
        .arg(server.dir.join(script))
        .args([&server.port.to_string(), "capibara", "imap-pw"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{script} failed");
    String::from_utf8(out.stdout).unwrap()
}

fn append(server: &Server, flags: &str, message: &str) {
    imap_script(
        server,
        "append.py",
        &["INBOX", flags],
        message.replace('\n', "\r\n").as_bytes(),
    );
}

fn unseen(server: &Server) -> usize {
    imap_script(server, "unseen.py", &["INBOX"], b"")
        .trim()
        .parse()
        .unwrap()
}

/// The bytes of the PDF-ish attachment (not UTF-8, so it must come back byte for byte).
const ATTACHMENT: &[u8] = b"%PDF-1.4\n\x00\x01\x02\xfe\xffbinary report\n";

async fn fetch(api: &Api, connector: &str) -> Value {
    let id = api
        .submit_id(
            json!({"kind": "connector.fetch", "input": {"connector_id": connector},
                          "max_attempts": 1}),
        )
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    job
}

async fn artifact(api: &Api, job: &Value, name: &str) -> (u16, Vec<u8>) {
    let url = api.url(&format!(
        "/v1/jobs/{}/artifacts/{name}",
        job["id"].as_str().unwrap()
    ));
    let r = api
        .http
        .get(url)
        .bearer_auth(&api.key)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn imap_connectors_list_new_messages_with_their_attachments_as_artifacts() {
    use base64::Engine as _;
    let env = env_allowing_loopback().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let imap = start_imap().await;

    append(
        &imap,
        "",
        "From: Ana <ana@example.org>\nTo: bot@capibara.test\nCc: Bo <bo@example.org>\n\
         Subject: Plain hello\nDate: Tue, 01 Dec 2026 09:00:00 +0000\n\
         Message-ID: <m1@example.org>\nContent-Type: text/plain; charset=utf-8\n\n\
         Just text.\n",
    );
    append(
        &imap,
        "",
        "From: news@example.org\nTo: bot@capibara.test\nSubject: HTML only\n\
         Date: Tue, 01 Dec 2026 10:00:00 +0000\nMessage-ID: <m2@example.org>\n\
         MIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n\n\
         <html><body><h1>News</h1><p>Rust <b>2026</b> is out.</p><script>x()</script></body></html>\n",
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(ATTACHMENT);
    append(
        &imap,
        "",
        &format!(
            "From: Ana <ana@example.org>\nTo: bot@capibara.test\nSubject: Report attached\n\
             Date: Tue, 01 Dec 2026 11:00:00 +0000\nMessage-ID: <m3@example.org>\n\
             MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"XX\"\n\n\
             --XX\nContent-Type: text/plain; charset=utf-8\n\nSee the report.\n\
             --XX\nContent-Type: application/pdf; name=\"report 2026.pdf\"\n\
             Content-Disposition: attachment; filename=\"report 2026.pdf\"\n\
             Content-Transfer-Encoding: base64\n\n{b64}\n--XX--\n"
        ),
    );
    append(
        &imap,
        "(\\Seen)",
        "From: old@example.org\nTo: bot@capibara.test\nSubject: Already read\n\
         Date: Tue, 01 Dec 2026 08:00:00 +0000\nMessage-ID: <m0@example.org>\n\n\
         Seen before.\n",
    );
    assert_eq!(unseen(&imap), 3);

    put_secret(&api, "IMAP_PASSWORD", "imap-pw").await;
    let config =
        json!({"host": "127.0.0.1", "port": imap.port, "tls": "none", "username": "capibara"});
    let secrets = json!({"auth.password": "IMAP_PASSWORD"});

    // The catalog has the type; bad definitions are 422s naming the field.
    let types = api.get("/v1/connector-types").await;
    let t = types.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "imap")
        .expect("imap is in the catalog")
        .clone();
    let schema = jsonschema::validator_for(&t["config_schema"]).unwrap();
    assert!(schema.is_valid(&t["example"]), "{t}");
    for (def, field) in [
        (
            json!({"name": "m", "type": "imap", "config": config}),
            "secrets.auth.password",
        ),
        (
            json!({"name": "m", "type": "imap", "secrets": secrets,
                   "config": {"host": "127.0.0.1", "port": 143, "tls": "ssl", "username": "u"}}),
            "config.tls",
        ),
        (
            json!({"name": "m", "type": "imap", "secrets": secrets,
                   "config": {"host": "127.0.0.1", "port": 143, "tls": "none"}}),
            "config.username",
        ),
        (
            json!({"name": "m", "type": "imap", "secrets": {"auth.token": "X"}, "config": config}),
            "secrets.auth.token",
        ),
    ] {
        let r = api.post("/v1/connectors", def).await;
        assert_eq!(r.status, 422, "{r:?}");
        assert_eq!(r.body["errors"][0]["field"], field, "{r:?}");
    }

    let create = |name: &str, config: Value| {
        let api = api.clone();
        let body = json!({"name": name, "type": "imap", "config": config, "secrets": secrets});
        async move {
            let c = api.post("/v1/connectors", body).await;
            assert_eq!(c.status, 201, "{c:?}");
            c.body["id"].as_str().unwrap().to_string()
        }
    };
    let all = create("inbox", config.clone()).await;
    let mut unseen_config = config.clone();
    unseen_config["unseen_only"] = json!(true);
    let unread = create("unread", unseen_config).await;

    // First fetch: every message, oldest date first; the attachment is an artifact.
    let job = fetch(&api, &all).await;
    let out = &job["output"];
    assert_eq!(
        (out["fetched"].as_u64(), out["new_items"].as_u64()),
        (Some(4), Some(4)),
        "{out}"
    );
    let items = out["items"].as_array().unwrap();
    let titles: Vec<&str> = items.iter().map(|i| i["title"].as_str().unwrap()).collect();
    assert_eq!(
        titles,
        [
            "Already read",
            "Plain hello",
            "HTML only",
            "Report attached"
        ]
    );
    let plain = &items[1];
    assert_eq!(plain["content"].as_str().unwrap().trim(), "Just text.");
    assert_eq!(plain["authors"], json!(["\"Ana\" <ana@example.org>"]));
    assert_eq!(plain["published"], "2026-12-01T09:00:00Z");
    assert_eq!(plain["fields"]["to"], json!(["bot@capibara.test"]));
    assert_eq!(plain["fields"]["cc"], json!(["\"Bo\" <bo@example.org>"]));
    assert_eq!(plain["fields"]["message_id"], json!(["<m1@example.org>"]));
    assert_eq!(plain["data"]["headers"]["Subject"], "Plain hello");
    let uidvalidity = out["cursor"]["uidvalidity"].as_u64().unwrap();
    assert!(
        plain["id"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{uidvalidity}:")),
        "{plain}"
    );
    let html = items[2]["content"].as_str().unwrap();
    assert!(
        html.contains("News") && html.contains("Rust 2026 is out."),
        "{html}"
    );
    assert!(!html.contains('<') && !html.contains("x()"), "{html}");
    let report = &items[3];
    assert_eq!(
        report["content"].as_str().unwrap().trim(),
        "See the report."
    );
    assert_eq!(report["fields"]["attachments"], json!(["report 2026.pdf"]));
    let name = report["fields"]["attachment_artifacts"][0]
        .as_str()
        .unwrap();
    assert!(name.ends_with("-report_2026.pdf"), "{name}");
    let (status, bytes) = artifact(&api, &job, name).await;
    assert_eq!((status, bytes.as_slice()), (200, ATTACHMENT));
    let (status, jsonl) = artifact(&api, &job, "items.jsonl").await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8(jsonl).unwrap().lines().count(), 4);
    // Reading never marks a message seen.
    assert_eq!(unseen(&imap), 3);

    // The unseen-only connector lists the three unread ones.
    let job = fetch(&api, &unread).await;
    let titles: Vec<&str> = job["output"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["Plain hello", "HTML only", "Report attached"]);
    assert_eq!(unseen(&imap), 3);

    // Second fetch: nothing new.
    let job = fetch(&api, &all).await;
    assert_eq!(
        (
            job["output"]["fetched"].as_u64(),
            job["output"]["new_items"].as_u64()
        ),
        (Some(0), Some(0)),
        "{job}"
    );
    assert_eq!(job["output"]["cursor"]["uidvalidity"], uidvalidity);

    // A message that arrives later is the third fetch's only item.
    append(
        &imap,
        "",
        "From: Ana <ana@example.org>\nTo: bot@capibara.test\nSubject: Later\n\
         Date: Wed, 02 Dec 2026 09:00:00 +0000\nMessage-ID: <m4@example.org>\n\n\
         Arrived later.\n",
    );
    let job = fetch(&api, &all).await;
    let out = &job["output"];
    assert_eq!(out["new_items"], 1, "{out}");
    assert_eq!(out["items"][0]["title"], "Later");
    assert_eq!(
        out["items"][0]["content"].as_str().unwrap().trim(),
        "Arrived later."
    );

    // A wrong password ends the fetch with a clear error.
    put_secret(&api, "IMAP_WRONG", "nope").await;
    let c = api
        .post(
            "/v1/connectors",
            json!({"name": "wrong", "type": "imap", "config": config,
                   "secrets": {"auth.password": "IMAP_WRONG"}}),
        )
        .await;
    let id = api
        .submit_id(json!({"kind": "connector.fetch",
                          "input": {"connector_id": c.body["id"]}, "max_attempts": 1}))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(
        (job["status"].as_str(), job["error"]["type"].as_str()),
        (Some("failed"), Some("access_denied")),
        "{job}"
    );
}
