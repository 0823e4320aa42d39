//! The LLM provider protocols `llm.generate` and `llm.chat` speak (docs/llm.md): OpenAI's chat
//! completions ([`openai`]) and Anthropic's Messages API ([`anthropic`]), each as a request
//! builder and readers of a whole answer and of a streamed one ([`sse`] events).

pub mod anthropic;
pub mod openai;
pub mod sse;

use capibara_shared::domain::{
    kinds::llm::{LlmInput, Message},
    llm::{ProviderDef, ProviderType},
};

/// An HTTP request to send to a provider.
#[derive(Debug, Clone)]
pub struct Request {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// An answer, whole or as read so far from a stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    pub text: String,
    pub model: Option<String>,
    pub finish_reason: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// The stream said it is over (a stream cut before this is a failure).
    pub done: bool,
}

/// What one call sends: the model, the conversation and the parameters.
pub struct Call<'a> {
    pub model: &'a str,
    pub messages: &'a [Message],
    pub input: &'a LlmInput,
    pub stream: bool,
    pub api_key: Option<&'a str>,
}

/// The request of `call` to `provider`.
pub fn request(provider: &ProviderDef, call: &Call<'_>) -> Request {
    match provider.protocol {
        ProviderType::Openai => openai::request(provider, call),
        ProviderType::Anthropic => anthropic::request(provider, call),
    }
}

/// A whole (not streamed) answer's body.
pub fn read_body(protocol: ProviderType, body: &[u8]) -> Result<Answer, String> {
    match protocol {
        ProviderType::Openai => openai::read_body(body),
        ProviderType::Anthropic => anthropic::read_body(body),
    }
}

/// One event of a streamed answer: updates `answer`, returns the text it adds; `Err` when the
/// provider reports an error in the stream.
pub fn read_event(
    protocol: ProviderType,
    event: &sse::Event,
    answer: &mut Answer,
) -> Result<Option<String>, String> {
    match protocol {
        ProviderType::Openai => openai::read_event(event, answer),
        ProviderType::Anthropic => anthropic::read_event(event, answer),
    }
}

/// The error message in a provider's error body (`{"error": {"message": …}}` for both), or
/// the body's start.
pub fn error_message(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    if let Some(m) = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("error"))
            .and_then(|m| m.as_str())
    }) {
        return m.chars().take(500).collect();
    }
    String::from_utf8_lossy(body).chars().take(500).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_read() {
        assert_eq!(
            error_message(br#"{"error":{"message":"bad key","type":"x"}}"#),
            "bad key"
        );
        assert_eq!(error_message(b"oops"), "oops");
    }
}
