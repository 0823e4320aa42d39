//! OpenAI's chat completions (`POST {base_url}/chat/completions`), which vLLM, Ollama,
//! llama.cpp's server and most gateways speak too.

use serde_json::{json, Map, Value};

use capibara_shared::domain::llm::ProviderDef;

use super::{sse::Event, Answer, Call, Request};

pub fn request(provider: &ProviderDef, call: &Call<'_>) -> Request {
    let messages: Vec<Value> = call
        .messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    let mut body = Map::new();
    body.insert("model".into(), json!(call.model));
    body.insert("messages".into(), Value::Array(messages));
    body.insert("max_tokens".into(), json!(call.input.max_tokens()));
    if let Some(p) = &call.input.params {
        if let Some(t) = p.temperature {
            body.insert("temperature".into(), json!(t));
        }
        if let Some(t) = p.top_p {
            body.insert("top_p".into(), json!(t));
        }
        if let Some(s) = &p.stop {
            body.insert("stop".into(), json!(s));
        }
    }
    if call.stream {
        body.insert("stream".into(), json!(true));
        // The last chunk then carries the token counts.
        body.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let mut headers = provider.auth_headers(call.api_key);
    headers.push(("content-type".into(), "application/json".into()));
    if call.stream {
        headers.push(("accept".into(), "text/event-stream".into()));
    }
    Request {
        url: provider.endpoint("chat/completions"),
        headers,
        body: Value::Object(body).to_string().into_bytes(),
    }
}

fn usage(v: &Value, answer: &mut Answer) {
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        answer.input_tokens = u.get("prompt_tokens").and_then(Value::as_u64);
        answer.output_tokens = u.get("completion_tokens").and_then(Value::as_u64);
    }
}

pub fn read_body(body: &[u8]) -> Result<Answer, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON: {e}"))?;
    let choice = v
        .pointer("/choices/0")
        .ok_or("the answer has no `choices`")?;
    let mut answer = Answer {
        text: choice
            .pointer("/message/content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        model: v.get("model").and_then(Value::as_str).map(str::to_string),
        finish_reason: choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_string),
        done: true,
        ..Answer::default()
    };
    usage(&v, &mut answer);
    Ok(answer)
}

pub fn read_event(event: &Event, answer: &mut Answer) -> Result<Option<String>, String> {
    if event.data.trim() == "[DONE]" {
        answer.done = true;
        return Ok(None);
    }
    let v: Value = serde_json::from_str(&event.data)
        .map_err(|e| format!("a stream event is not JSON: {e}"))?;
    if let Some(e) = v.get("error") {
        return Err(e
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("the provider reported an error")
            .to_string());
    }
    if answer.model.is_none() {
        answer.model = v.get("model").and_then(Value::as_str).map(str::to_string);
    }
    usage(&v, answer);
    let Some(choice) = v.pointer("/choices/0") else {
        return Ok(None);
    };
    if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
        answer.finish_reason = Some(f.to_string());
    }
    let text = choice
        .pointer("/delta/content")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    if let Some(t) = &text {
        answer.text.push_str(t);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use capibara_shared::domain::kinds::llm::{LlmInput, Message, Role};

    #[test]
    fn request_and_answers() {
        let input: LlmInput = serde_json::from_value(json!({"model": "m", "prompt": "hi",
            "params": {"temperature": 0.5, "stop": ["\n"]}}))
        .unwrap();
        let messages = vec![Message {
            role: Role::User,
            content: "hi".into(),
        }];
        let provider: ProviderDef = serde_json::from_value(
            json!({"type": "openai", "base_url": "http://h/v1/", "models": ["m"]}),
        )
        .unwrap();
        let r = request(
            &provider,
            &Call {
                model: "m",
                messages: &messages,
                input: &input,
                stream: true,
                api_key: Some("k"),
            },
        );
        assert_eq!(r.url, "http://h/v1/chat/completions");
        assert!(r
            .headers
            .contains(&("authorization".into(), "Bearer k".into())));
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
        assert_eq!(body["stream_options"]["include_usage"], json!(true));
        assert_eq!(body["temperature"], json!(0.5));

        let whole = read_body(br#"{"model":"m-1","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#).unwrap();
        assert_eq!(
            (whole.text.as_str(), whole.input_tokens, whole.output_tokens),
            ("Hello", Some(3), Some(1))
        );

        let mut a = Answer::default();
        let ev = |d: &str| Event {
            name: None,
            data: d.into(),
        };
        assert_eq!(
            read_event(&ev(r#"{"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"He"},"finish_reason":null}]}"#), &mut a).unwrap(),
            Some("He".into())
        );
        read_event(
            &ev(r#"{"choices":[{"index":0,"delta":{"content":"llo"},"finish_reason":"stop"}]}"#),
            &mut a,
        )
        .unwrap();
        read_event(
            &ev(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#),
            &mut a,
        )
        .unwrap();
        assert!(!a.done);
        read_event(&ev("[DONE]"), &mut a).unwrap();
        assert_eq!(a.text, "Hello");
        assert_eq!(a.finish_reason.as_deref(), Some("stop"));
        assert_eq!(a.output_tokens, Some(2));
        assert!(a.done);
        assert!(read_event(&ev(r#"{"error":{"message":"overloaded"}}"#), &mut a).is_err());
    }
}
