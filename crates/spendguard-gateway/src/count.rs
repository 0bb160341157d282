//! The worst case of a request, before it is forwarded: its input tokens and the most
//! output it may produce.
//!
//! Input tokens are counted with OpenAI's own tokenizers (`tiktoken-rs`: `o200k_base` for the
//! GPT-4o, GPT-4.1, GPT-5 and o-series families, `cl100k_base` for GPT-4 and GPT-3.5, and
//! `o200k_base` for an OpenAI-kind model it does not know). The count covers every string in
//! the request that reaches the model (message contents and parts, names, tool calls and
//! their arguments, instructions, tool definitions as JSON) plus a fixed per-message
//! overhead, so it errs high: the chat format's own markers are 3 tokens a message and 3 for
//! the reply, counted here as 4 and 4. An image part is counted as [`IMAGE_TOKENS`].
//!
//! Anthropic publishes no tokenizer. Its models are bounded by the UTF-8 bytes of the same
//! strings divided by 3 (rounded up; English averages about 4 bytes a Claude token, code and
//! other scripts fewer), plus the same per-message overhead. A bound can still be beaten by
//! unusual text: the commit then charges the real usage, above the estimate by at most the
//! record ceiling (`max_record_cost_usd`).

use serde_json::Value;
use spendguard_core::config::UpstreamKind;
use tiktoken_rs::CoreBPE;

/// Tokens a message's framing costs at most.
pub const PER_MESSAGE: u64 = 4;
/// Tokens the reply's priming costs at most.
pub const PER_REPLY: u64 = 4;
/// Tokens counted for an image part: a high-detail 2048×2048 image on GPT-4o is 1,105
/// tokens, on Claude at most about 1,600 (1.15 megapixels / 750).
pub const IMAGE_TOKENS: u64 = 1_600;

/// How a model's input is counted.
#[derive(Clone, Copy)]
pub enum Counter {
    Bpe(&'static CoreBPE),
    /// UTF-8 bytes / 3, rounded up.
    Bytes,
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Counter::Bpe(_) => f.write_str("Bpe"),
            Counter::Bytes => f.write_str("Bytes"),
        }
    }
}

impl Counter {
    pub fn for_model(kind: UpstreamKind, model: &str) -> Counter {
        match kind {
            UpstreamKind::Anthropic => Counter::Bytes,
            UpstreamKind::Openai => {
                let cl100k = (model.starts_with("gpt-4")
                    && !model.starts_with("gpt-4o")
                    && !model.starts_with("gpt-4.1"))
                    || model.starts_with("gpt-3.5")
                    || model.starts_with("gpt-35")
                    || model.starts_with("text-embedding-3")
                    || model.starts_with("text-embedding-ada");
                if cl100k {
                    Counter::Bpe(tiktoken_rs::cl100k_base_singleton())
                } else {
                    Counter::Bpe(tiktoken_rs::o200k_base_singleton())
                }
            }
        }
    }

    /// Tokens of one piece of text.
    pub fn text(self, s: &str) -> u64 {
        match self {
            Counter::Bpe(bpe) => bpe.encode_ordinary(s).len() as u64,
            Counter::Bytes => (s.len() as u64).div_ceil(3),
        }
    }
}

/// Counts every string that reaches the model in `v`: strings anywhere in it, except the
/// values of keys that only steer the API (`role`, `type`, ids, `model`), and images, which
/// count [`IMAGE_TOKENS`] each rather than their URL or bytes.
fn strings(counter: Counter, v: &Value) -> u64 {
    match v {
        Value::String(s) => counter.text(s),
        Value::Array(items) => items.iter().map(|x| strings(counter, x)).sum(),
        Value::Object(map) => {
            if is_image(map) {
                return IMAGE_TOKENS;
            }
            map.iter()
                .filter(|(k, _)| {
                    !matches!(
                        k.as_str(),
                        "role"
                            | "type"
                            | "id"
                            | "model"
                            | "cache_control"
                            | "detail"
                            | "tool_call_id"
                            | "tool_use_id"
                    )
                })
                .map(|(_, x)| strings(counter, x))
                .sum()
        }
        _ => 0,
    }
}

fn is_image(map: &serde_json::Map<String, Value>) -> bool {
    matches!(
        map.get("type").and_then(Value::as_str),
        Some("image_url" | "image" | "input_image")
    )
}

/// Counts tool definitions (their JSON schema is part of the prompt) as their JSON text.
fn tools(counter: Counter, v: Option<&Value>) -> u64 {
    match v {
        Some(t @ Value::Array(a)) if !a.is_empty() => counter.text(&t.to_string()),
        _ => 0,
    }
}

fn messages(counter: Counter, v: Option<&Value>) -> u64 {
    match v {
        Some(Value::Array(list)) => list.iter().map(|m| PER_MESSAGE + strings(counter, m)).sum(),
        Some(other) => PER_MESSAGE + strings(counter, other),
        None => 0,
    }
}

/// OpenAI chat completions: `messages`, `tools`, `functions`.
pub fn chat_input(counter: Counter, body: &Value) -> u64 {
    messages(counter, body.get("messages"))
        + tools(counter, body.get("tools"))
        + tools(counter, body.get("functions"))
        + PER_REPLY
}

/// OpenAI responses: `input` (a string or items), `instructions`, `tools`.
pub fn responses_input(counter: Counter, body: &Value) -> u64 {
    let input = match body.get("input") {
        Some(Value::String(s)) => PER_MESSAGE + counter.text(s),
        other => messages(counter, other),
    };
    let instructions = match body.get("instructions") {
        Some(Value::String(s)) => PER_MESSAGE + counter.text(s),
        _ => 0,
    };
    input + instructions + tools(counter, body.get("tools")) + PER_REPLY
}

/// OpenAI embeddings: `input`, a string, strings, or arrays of token ids (counted as they
/// are).
pub fn embeddings_input(counter: Counter, body: &Value) -> u64 {
    match body.get("input") {
        Some(Value::String(s)) => counter.text(s),
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| match x {
                Value::String(s) => counter.text(s),
                Value::Array(ids) => ids.len() as u64,
                Value::Number(_) => 1,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// Anthropic messages: `system` (a string or blocks), `messages`, `tools`.
pub fn messages_input(counter: Counter, body: &Value) -> u64 {
    let system = match body.get("system") {
        Some(s) => PER_MESSAGE + strings(counter, s),
        None => 0,
    };
    system + messages(counter, body.get("messages")) + tools(counter, body.get("tools")) + PER_REPLY
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_chat_request_counts_its_text_with_the_model_tokenizer_and_errs_high() {
        let counter = Counter::for_model(UpstreamKind::Openai, "gpt-4o-mini");
        let body = json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "Hello, world!"}]}
            ]
        });
        let exact = counter.text("You are terse.") + counter.text("Hello, world!");
        // o200k_base: "Hello, world!" is 4 tokens.
        assert_eq!(counter.text("Hello, world!"), 4);
        assert_eq!(
            chat_input(counter, &body),
            exact + 2 * PER_MESSAGE + PER_REPLY
        );
    }

    #[test]
    fn images_count_a_fixed_bound_not_their_bytes() {
        let counter = Counter::for_model(UpstreamKind::Openai, "gpt-4o");
        let url = format!("data:image/png;base64,{}", "A".repeat(100_000));
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}
        ]}]});
        assert_eq!(
            chat_input(counter, &body),
            IMAGE_TOKENS + PER_MESSAGE + PER_REPLY
        );
    }

    #[test]
    fn anthropic_counts_bytes_over_three_rounded_up() {
        let counter = Counter::for_model(UpstreamKind::Anthropic, "claude-sonnet-4-5");
        let body = json!({
            "system": "abcd",
            "messages": [{"role": "user", "content": "héllo"}]
        });
        // "abcd": 4 bytes → 2; "héllo": 6 bytes → 2.
        assert_eq!(
            messages_input(counter, &body),
            2 + 2 + 2 * PER_MESSAGE + PER_REPLY
        );
    }

    #[test]
    fn embeddings_count_strings_and_token_arrays() {
        let counter = Counter::for_model(UpstreamKind::Openai, "text-embedding-3-small");
        let body = json!({"input": ["Hello, world!", [1, 2, 3]]});
        assert_eq!(
            embeddings_input(counter, &body),
            counter.text("Hello, world!") + 3
        );
    }
}
