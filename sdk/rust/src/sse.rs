//! Server-sent events: a parser for `text/event-stream` (WHATWG HTML §9.2) and a reader that
//! follows a Capibara event stream, reconnecting with `Last-Event-ID` after a dropped
//! connection, so that nothing is lost and nothing repeated.

use std::{collections::VecDeque, pin::Pin, time::Duration};

use futures::{Stream, StreamExt};

use crate::{
    error::{Error, Result},
    http::{backoff, Http, Req},
    types::Event,
};

/// One dispatched server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The last `id:` seen (it persists across events, as in a browser).
    pub id: String,
    /// `event:` (default `message`).
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The last valid `retry:` in milliseconds.
    pub retry: Option<u64>,
}

/// An incremental `text/event-stream` parser: feed it bytes split anywhere (inside a UTF-8
/// sequence, between `\r` and `\n`), take the events it completed.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    started: bool,
    last_id: String,
    retry: Option<u64>,
    data: Vec<String>,
    has_data: bool,
    event: String,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Feed `chunk`; the events it completes.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(chunk);
        if !self.started && self.buf.len() >= 3 {
            if self.buf.starts_with(&[0xEF, 0xBB, 0xBF]) {
                self.buf.drain(..3);
            }
            self.started = true;
        }
        self.lines(false)
    }

    /// The stream ended: a last line without its newline is taken; an event not followed by a
    /// blank line is not dispatched (as the standard says).
    pub fn finish(&mut self) -> Vec<SseEvent> {
        self.lines(true)
    }

    /// The last event id seen.
    pub fn last_id(&self) -> &str {
        &self.last_id
    }

    fn lines(&mut self, end: bool) -> Vec<SseEvent> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < self.buf.len() {
            let c = self.buf[i];
            if c == b'\n' || c == b'\r' {
                // A trailing `\r` waits for a possible `\n`.
                if c == b'\r' && i + 1 == self.buf.len() && !end {
                    break;
                }
                let line = String::from_utf8_lossy(&self.buf[start..i]).into_owned();
                if c == b'\r' && self.buf.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
                if let Some(ev) = self.take(&line) {
                    out.push(ev);
                }
            }
            i += 1;
        }
        self.buf.drain(..start);
        if end && !self.buf.is_empty() {
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
            self.take(&line);
        }
        out
    }

    fn take(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let ev = self.has_data.then(|| SseEvent {
                id: self.last_id.clone(),
                event: if self.event.is_empty() {
                    "message".into()
                } else {
                    self.event.clone()
                },
                data: self.data.join("\n"),
                retry: self.retry,
            });
            self.data.clear();
            self.has_data = false;
            self.event.clear();
            return ev;
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line, ""),
        };
        match field {
            "data" => {
                self.data.push(value.to_string());
                self.has_data = true;
            }
            "event" => self.event = value.to_string(),
            "id" if !value.contains('\0') => self.last_id = value.to_string(),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry = value.parse().ok();
            }
            _ => {}
        }
        None
    }
}

/// A response body as a stream of byte chunks.
type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Vec<u8>>> + Send>>;

/// Which streams end, and on which event: a job's and a run's close after their terminal
/// event; the firehose never ends.
pub(crate) type Terminal = fn(&str) -> bool;

pub(crate) fn job_terminal(t: &str) -> bool {
    matches!(t, "JobSucceeded" | "JobFailed" | "JobCanceled")
}

pub(crate) fn run_terminal(t: &str) -> bool {
    matches!(t, "RunSucceeded" | "RunFailed" | "RunCanceled")
}

fn is_event_stream(res: &reqwest::Response) -> bool {
    res.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Reconnects in a row without an event before the stream gives up.
const MAX_RECONNECTS: u32 = 10;

struct Follow {
    http: Http,
    path: String,
    query: Vec<(&'static str, String)>,
    last_id: Option<String>,
    terminal: Option<Terminal>,
    body: Option<ByteStream>,
    parser: SseParser,
    pending: VecDeque<Event>,
    /// Connections in a row that failed or delivered nothing.
    failures: u32,
    /// Events this connection delivered.
    received: usize,
    retry: Option<Duration>,
    done: bool,
}

/// Follow the SSE stream at `path` from after `last_event_id` (from the start when `None`):
/// its events as they happen. A dropped connection is resumed with `Last-Event-ID` = the last
/// id received. The stream ends after a `terminal` event, or when the server closes a
/// connection that delivered nothing (resumed after the end); an error answer, or
/// `MAX_RECONNECTS` failed reconnects in a row, is the stream's last item.
pub(crate) fn follow(
    http: Http,
    path: String,
    query: Vec<(&'static str, String)>,
    last_event_id: Option<String>,
    terminal: Option<Terminal>,
) -> Pin<Box<dyn Stream<Item = Result<Event>> + Send>> {
    let state = Follow {
        http,
        path,
        query,
        last_id: last_event_id,
        terminal,
        body: None,
        parser: SseParser::new(),
        pending: VecDeque::new(),
        failures: 0,
        received: 0,
        retry: None,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut s| async move {
        let item = s.next_item().await?;
        Some((item, s))
    }))
}

impl Follow {
    async fn next_item(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(Ok(ev));
            }
            if self.done {
                return None;
            }
            let Some(body) = self.body.as_mut() else {
                if let Err(e) = self.connect().await {
                    self.done = true;
                    return Some(Err(e));
                }
                continue;
            };
            match body.next().await {
                Some(Ok(chunk)) => {
                    let events = self.parser.push(&chunk);
                    if let Err(e) = self.take(events) {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                Some(Err(e)) => {
                    // The connection broke: resume after the last event received.
                    self.body = None;
                    if let Err(e) = self.pause(Error::Transport(e)).await {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                None => {
                    let events = self.parser.finish();
                    if let Err(e) = self.take(events) {
                        self.done = true;
                        return Some(Err(e));
                    }
                    self.body = None;
                    // Closed by the server: the end of a stream that ends (nothing came: it was
                    // resumed after its end), else a restart to resume from.
                    if self.received == 0 || self.terminal.is_none() {
                        if self.terminal.is_some() {
                            self.done = true;
                        } else if let Err(e) = self
                            .pause(Error::Timeout(format!(
                                "GET {}: the event stream kept closing",
                                self.path
                            )))
                            .await
                        {
                            self.done = true;
                            return Some(Err(e));
                        }
                    }
                }
            }
        }
    }

    /// Queue the envelopes of `events`; a terminal one ends the stream after it.
    fn take(&mut self, events: Vec<SseEvent>) -> Result<()> {
        for ev in events {
            if let Some(r) = ev.retry {
                self.retry = Some(Duration::from_millis(r));
            }
            let envelope: Event = serde_json::from_str(&ev.data).map_err(|e| {
                Error::decode(format!("an event of GET {}: {}", self.path, ev.data), e)
            })?;
            if !ev.id.is_empty() {
                self.last_id = Some(ev.id.clone());
            }
            self.received += 1;
            self.failures = 0;
            let ends = self.terminal.is_some_and(|t| t(&envelope.event_type));
            self.pending.push_back(envelope);
            if ends {
                self.done = true;
                self.body = None;
                break;
            }
        }
        Ok(())
    }

    async fn connect(&mut self) -> Result<()> {
        let mut req = Req::get(self.path.clone());
        req.query = self.query.clone();
        let req = req
            .header("accept", Some("text/event-stream".into()))
            .header("last-event-id", self.last_id.clone());
        // No timeout: the stream stays open as long as the job runs.
        let sent = self.http.build(&req, None).send().await;
        match sent {
            Ok(res) if res.status().is_success() && !is_event_stream(&res) => {
                let status = res.status().as_u16();
                Err(Error::Problem(Box::new(crate::error::Problem {
                    status,
                    problem_type: "about:blank".into(),
                    title: "Not an event stream".into(),
                    detail: format!(
                        "GET {} answered {:?}, not text/event-stream",
                        self.path,
                        res.headers().get(reqwest::header::CONTENT_TYPE)
                    ),
                    errors: Vec::new(),
                })))
            }
            Ok(res) if res.status().is_success() => {
                self.parser = SseParser::new();
                self.received = 0;
                self.body = Some(Box::pin(res.bytes_stream().map(|r| r.map(|b| b.to_vec()))));
                Ok(())
            }
            Ok(res) => {
                let status = res.status().as_u16();
                let retry_after = crate::http::retry_after(res.headers());
                let body = res.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                let e = Error::from_answer(status, retry_after, &body);
                if matches!(status, 429 | 502..=504) {
                    self.pause(e).await
                } else {
                    Err(e)
                }
            }
            Err(e) => self.pause(Error::Transport(e)).await,
        }
    }

    /// Wait before reconnecting, or give up with `why` after too many failures in a row.
    async fn pause(&mut self, why: Error) -> Result<()> {
        if self.failures >= MAX_RECONNECTS {
            return Err(why);
        }
        let wait = match &why {
            Error::RateLimited {
                retry_after: Some(d),
                ..
            } => *d,
            _ => self.retry.unwrap_or_else(|| backoff(self.failures)),
        };
        self.failures += 1;
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(p.push(c));
        }
        out.extend(p.finish());
        out
    }

    #[test]
    fn frames_give_id_event_and_joined_data() {
        let evs = parse_all(&[b"id: 7\nevent: JobQueued\ndata: {\"a\":\ndata: 1}\n\n"]);
        assert_eq!(
            evs,
            vec![SseEvent {
                id: "7".into(),
                event: "JobQueued".into(),
                data: "{\"a\":\n1}".into(),
                retry: None
            }]
        );
    }

    #[test]
    fn chunks_split_anywhere_give_the_same_events() {
        let text = "id: 1\r\nevent: a\r\ndata: héllo\r\n\r\n: keep-alive\n\nid: 2\rdata: x\r\r";
        let whole = parse_all(&[text.as_bytes()]);
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[0].data, "héllo");
        assert_eq!(whole[1].id, "2");
        // Every split point, including inside `é` and between `\r` and `\n`.
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            assert_eq!(
                parse_all(&[&bytes[..i], &bytes[i..]]),
                whole,
                "split at {i}"
            );
        }
        // One byte at a time.
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse_all(&singles), whole);
    }

    #[test]
    fn comments_events_without_data_and_unknown_fields_are_skipped() {
        let evs = parse_all(&[b": ping\n\nevent: nothing\n\nfoo: bar\ndata\n\n"]);
        // `data` without a colon is a data line with an empty value.
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].data, "");
        assert_eq!(evs[0].event, "message");
    }

    #[test]
    fn the_id_persists_and_retry_takes_only_digits() {
        let evs = parse_all(&[b"id: 5\nretry: 1500\ndata: a\n\nretry: x\ndata: b\n\n"]);
        assert_eq!(evs[1].id, "5");
        assert_eq!(evs[1].retry, Some(1500));
    }

    #[test]
    fn a_bom_is_dropped_and_an_unterminated_event_is_not_dispatched() {
        let evs = parse_all(&[b"\xEF\xBB", b"\xBFdata: a\n\ndata: cut"]);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].data, "a");
    }

    #[test]
    fn terminal_types_end_job_and_run_streams() {
        assert!(job_terminal("JobCanceled") && !job_terminal("JobAttemptFailed"));
        assert!(run_terminal("RunSucceeded") && !run_terminal("StepSucceeded"));
    }
}
