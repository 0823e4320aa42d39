//! An incremental parser of server-sent events (the WHATWG `text/event-stream` format, as
//! OpenAI's and Anthropic's streaming answers use it): bytes in as they arrive, whole events out.

/// One event: its `event:` name (if any) and its `data:` lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: Option<String>,
    pub data: String,
}

#[derive(Debug, Default)]
pub struct Parser {
    /// Bytes of the line not yet ended.
    line: Vec<u8>,
    name: Option<String>,
    data: Option<String>,
    /// The previous byte was a `\r` (a `\n` right after it ends no second line).
    after_cr: bool,
}

impl Parser {
    /// Feed bytes; returns the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(ev) = self.line_done(&line) {
                        out.push(ev);
                    }
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(b);
                }
            }
        }
        out
    }

    fn line_done(&mut self, line: &[u8]) -> Option<Event> {
        if line.is_empty() {
            // A blank line dispatches the event (one with no data is dropped).
            let name = self.name.take();
            return self.data.take().map(|data| Event { name, data });
        }
        if line[0] == b':' {
            return None;
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.find(':') {
            Some(i) => {
                let v = &text[i + 1..];
                (&text[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (text.as_ref(), ""),
        };
        match field {
            "event" => self.name = Some(value.to_string()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere() {
        let stream = b": comment\r\nevent: message_start\r\ndata: {\"a\":1}\r\n\r\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        for step in [1, 2, 3, 7, stream.len()] {
            let mut p = Parser::default();
            let mut got = Vec::new();
            for piece in stream.chunks(step) {
                got.extend(p.feed(piece));
            }
            assert_eq!(
                got,
                vec![
                    Event {
                        name: Some("message_start".into()),
                        data: "{\"a\":1}".into()
                    },
                    Event {
                        name: None,
                        data: "x\ny".into()
                    },
                    Event {
                        name: None,
                        data: "[DONE]".into()
                    },
                ],
                "pieces of {step}"
            );
        }
    }
}
