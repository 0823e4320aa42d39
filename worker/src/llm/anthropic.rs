//! Anthropic's Messages API (`POST {base_url}/v1/messages`, `anthropic-version: 2023-06-01`).

use capibara_shared::domain::{kinds::llm::Role, llm::ProviderDef};
use serde_json::{json, Map, Value};

use super::{sse::Event, Answer, Call, Request};

/// Anthropic's stop reasons in OpenAI's words.
fn finish(reason: &str) -> String {
    match reason {
        "end_turn" | "stop_sequence" => "stop",
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        other => other,
    }
    .to_string()
}

pub fn request(provider: &ProviderDef, call: &Call<'_>) -> Request {
    // System messages go to `system`; the others alternate as given.
    let system: Vec<&str> = call
        .messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.as_str())
        .collect();
    let messages: Vec<Value> = call
        .messages
        .iter()
        .filter(|m| m.role != Role::System)
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    let mut body = Map::new();
    body.insert("model".into(), json!(call.model));
    body.insert("max_tokens".into(), json!(call.input.max_tokens()));
    if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n\n")));
    }
    body.insert("messages".into(), Value::Array(messages));
    if let Some(p) = &call.input.params {
        if let Some(t) = p.temperature {
            body.insert("temperature".into(), json!(t.min(1.0)));
        }
        if let Some(t) = p.top_p {
            body.insert("top_p".into(), json!(t));
        }
        if let Some(s) = &p.stop {
            body.insert("stop_sequences".into(), json!(s));
        }
    }
    if call.stream {
        body.insert("stream".into(), json!(true));
    }
    let mut headers = provider.auth_headers(call.api_key);
    headers.push(("content-type".into(), "application/json".into()));
    if call.stream {
        headers.push(("accept".into(), "text/event-stream".into()));
    }
    Request {
        url: provider.endpoint("messages"),
        headers,
        body: Value::Object(body).to_string().into_bytes(),
    }
}

pub fn read_body(body: &[u8]) -> Result<Answer, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON: {e}"))?;
    let content = v
        .get("content")
        .and_then(Value::as_array)
        .ok_or("the answer has no `content`")?;
    let text: String = content
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect();
    Ok(Answer {
        text,
        model: v.get("model").and_then(Value::as_str).map(str::to_string),
        finish_reason: v.get("stop_reason").and_then(Value::as_str).map(finish),
        input_tokens: v.pointer("/usage/input_tokens").and_then(Value::as_u64),
        output_tokens: v.pointer("/usage/output_tokens").and_then(Value::as_u64),
        done: true,
    })
}

pub fn read_event(event: &Event, answer: &mut Answer) -> Result<Option<String>, String> {
    let v: Value = serde_json::from_str(&event.data)
        .map_err(|e| format!("a stream event is not JSON: {e}"))?;
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .or(event.name.as_deref())
        .unwrap_or_default();
    match kind {
        "message_start" => {
            answer.model = v
                .pointer("/message/model")
                .and_then(Value::as_str)
                .map(str::to_string);
            answer.input_tokens = v
                .pointer("/message/usage/input_tokens")
                .and_then(Value::as_u64);
        }
        "content_block_delta" => {
            if let Some(t) = v
                .pointer("/delta/text")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                answer.text.push_str(t);
                return Ok(Some(t.to_string()));
            }
        }
        "message_delta" => {
            if let Some(r) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                answer.finish_reason = Some(finish(r));
            }
            if let Some(n) = v.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                answer.output_tokens = Some(n);
            }
        }
        "message_stop" => answer.done = true,
        "error" => {
            return Err(v
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("the provider reported an error")
                .to_string())
        }
        _ => {}
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use capibara_shared::domain::kinds::llm::LlmInput;

    #[test]
    fn request_and_answers() {
        let input: LlmInput = serde_json::from_value(json!({"model": "claude",
            "system": "be brief", "prompt": "hi"}))
        .unwrap();
        let messages = input.conversation();
        let provider: ProviderDef = serde_json::from_value(
            json!({"type": "anthropic", "base_url": "https://api.anthropic.com", "models": ["claude"]}),
        )
        .unwrap();
        let r = request(
            &provider,
            &Call {
                model: "claude",
                messages: &messages,
                input: &input,
                stream: false,
                api_key: Some("k"),
            },
        );
        assert_eq!(r.url, "https://api.anthropic.com/v1/messages");
        assert!(r.headers.contains(&("x-api-key".into(), "k".into())));
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["system"], json!("be brief"));
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
        assert_eq!(body["max_tokens"], json!(1024));

        let whole = read_body(br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[{"type":"text","text":"Hi there"}],"stop_reason":"end_turn","usage":{"input_tokens":5,"output_tokens":2}}"#).unwrap();
        assert_eq!(whole.text, "Hi there");
        assert_eq!(whole.finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            (whole.input_tokens, whole.output_tokens),
            (Some(5), Some(2))
        );

        let mut a = Answer::default();
        let ev = |n: &str, d: &str| Event {
            name: Some(n.into()),
            data: d.into(),
        };
        read_event(&ev("message_start", r#"{"type":"message_start","message":{"id":"m","model":"claude-x","usage":{"input_tokens":5,"output_tokens":1}}}"#), &mut a).unwrap();
        read_event(&ev("ping", r#"{"type":"ping"}"#), &mut a).unwrap();
        assert_eq!(
            read_event(&ev("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#), &mut a).unwrap(),
            Some("Hi".into())
        );
        read_event(&ev("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":7}}"#), &mut a).unwrap();
        assert!(!a.done);
        read_event(&ev("message_stop", r#"{"type":"message_stop"}"#), &mut a).unwrap();
        assert!(a.done);
        assert_eq!(
            (
                a.text.as_str(),
                a.input_tokens,
                a.output_tokens,
                a.finish_reason.as_deref()
            ),
            ("Hi", Some(5), Some(7), Some("length"))
        );
        assert!(read_event(
            &ev(
                "error",
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
            ),
            &mut a
        )
        .is_err());
    }
}
