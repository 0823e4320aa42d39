//! `llm.generate` and `llm.chat`'s input and output (docs/llm.md).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::input::KindInput;
use crate::domain::FieldError;

/// Who says a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Message {
    #[schema(inline)]
    pub role: Role,
    #[schema(max_length = 1000000)]
    pub content: String,
}

/// Sampling parameters, passed to the provider in its own terms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmParams {
    /// Most tokens to generate (default 1024; Anthropic requires a limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1000000)]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0, maximum = 2)]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0, maximum = 1)]
    pub top_p: Option<f64>,
    /// Stop sequences (at most 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_items = 4)]
    pub stop: Option<Vec<String>>,
}

/// `llm.generate` / `llm.chat`: one answer from a language model, through the namespace's
/// providers (`/v1/llm/providers`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmInput {
    /// A model name: the providers serving it are tried by priority, failing over to the
    /// next. Required unless `provider` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, min_length = 1, max_length = 200)]
    pub model: Option<String>,
    /// Pin one provider (no failover); with no `model`, its first listed model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, min_length = 1, max_length = 64)]
    pub provider: Option<String>,
    /// `llm.generate`: the prompt (a user message). Give `prompt` or `messages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 1000000)]
    pub prompt: Option<String>,
    /// The conversation (required for `llm.chat`), at most 1,000 messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false, min_items = 1, max_items = 1000)]
    pub messages: Option<Vec<Message>>,
    /// A system prompt (placed before `messages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 1000000)]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub params: Option<LlmParams>,
    /// Stream the answer as `JobOutputChunk` events `{text, provider}` as it arrives
    /// (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub stream: Option<bool>,
}

impl LlmInput {
    /// The conversation to send: `system`, then `messages`, then `prompt` as a user message.
    pub fn conversation(&self) -> Vec<Message> {
        let mut out = Vec::new();
        if let Some(system) = &self.system {
            out.push(Message {
                role: Role::System,
                content: system.clone(),
            });
        }
        out.extend(self.messages.iter().flatten().cloned());
        if let Some(prompt) = &self.prompt {
            out.push(Message {
                role: Role::User,
                content: prompt.clone(),
            });
        }
        out
    }

    pub fn max_tokens(&self) -> u32 {
        self.params
            .as_ref()
            .and_then(|p| p.max_tokens)
            .unwrap_or(1024)
    }

    pub fn streams(&self) -> bool {
        self.stream.unwrap_or(false)
    }
}

impl KindInput for LlmInput {
    fn check(&self) -> Result<(), FieldError> {
        if self.model.is_none() && self.provider.is_none() {
            return Err(FieldError::new("model", "give `model` or `provider`"));
        }
        if let Some(p) = &self.provider {
            crate::domain::llm::validate_name(p)
                .map_err(|e| FieldError::new("provider", e.message))?;
        }
        if self.prompt.is_none() && self.messages.is_none() {
            return Err(FieldError::new("prompt", "give `prompt` or `messages`"));
        }
        let bytes: usize = self.conversation().iter().map(|m| m.content.len()).sum();
        if bytes > 1_000_000 {
            return Err(FieldError::new(
                "messages",
                "the conversation is longer than 1,000,000 bytes",
            ));
        }
        Ok(())
    }
}

/// `llm.chat`'s input check: `messages` is required.
pub fn check_chat(input: &serde_json::Value) -> Result<(), FieldError> {
    let parsed = super::input::parse::<LlmInput>(input)?;
    if parsed.messages.is_none() {
        return Err(FieldError::new("messages", "`llm.chat` needs `messages`"));
    }
    Ok(())
}

/// Token counts, as the provider reported them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LlmUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
}

/// A provider that was tried and failed, in the order tried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LlmTry {
    pub provider: String,
    /// `circuit_open`, `connect_failed`, `timeout`, `http_status`, `stream_cut`, …
    pub error: String,
    pub message: String,
}

/// `llm.generate` / `llm.chat`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LlmOutput {
    /// The answer.
    pub text: String,
    /// The answer as a message (`role: assistant`), to append to a conversation.
    #[schema(inline)]
    pub message: Message,
    /// The provider that answered.
    pub provider: String,
    /// The model, as the provider named it.
    pub model: String,
    /// Why it stopped: `stop`, `length`, … (the provider's words, OpenAI's for Anthropic's
    /// `end_turn`/`max_tokens`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    #[schema(inline)]
    pub usage: LlmUsage,
    /// From sending to the end of the answer, with the provider that answered.
    pub latency_ms: f64,
    /// From sending to the first token (streamed calls).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    /// When the provider has prices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// Providers tried before the one that answered.
    #[schema(inline)]
    pub tries: Vec<LlmTry>,
}

/// The published schema of `llm.generate` (`chat`: of `llm.chat`, which needs `messages`):
/// the derived one, with the rules between fields.
pub fn llm_schema(chat: bool) -> serde_json::Value {
    use serde_json::json;
    let mut s = super::input::schema::<LlmInput>();
    s["properties"]["provider"]["pattern"] = json!("^[a-z][a-z0-9_-]*$");
    s["allOf"] = json!([
        {"anyOf": [{"required": ["model"]}, {"required": ["provider"]}]},
        if chat { json!({"required": ["messages"]}) }
        else { json!({"anyOf": [{"required": ["prompt"]}, {"required": ["messages"]}]}) }
    ]);
    s
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::domain::kinds::input::parse;

    #[test]
    fn inputs_are_checked_across_fields() {
        let ok: LlmInput = parse(&json!({"model": "m", "system": "s",
            "messages": [{"role": "user", "content": "a"}], "prompt": "b"}))
        .unwrap();
        let roles: Vec<Role> = ok.conversation().iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::System, Role::User, Role::User]);
        let field = |v: serde_json::Value| parse::<LlmInput>(&v).unwrap_err().field;
        assert_eq!(field(json!({"prompt": "x"})), "model");
        assert_eq!(field(json!({"model": "m"})), "prompt");
        assert_eq!(field(json!({"provider": "Bad", "prompt": "x"})), "provider");
        assert_eq!(
            field(json!({"model": "m", "messages": [{"role": "bot", "content": "x"}]})),
            "messages[0].role"
        );
        assert_eq!(
            check_chat(&json!({"model": "m", "prompt": "x"}))
                .unwrap_err()
                .field,
            "messages"
        );
        assert!(jsonschema::validator_for(&llm_schema(true)).is_ok());
    }
}
