//! The usage of an answer, as each API reports it, and the server-sent events of a stream.

use bytes::{Bytes, BytesMut};
use serde_json::Value;
use spendguard_core::Tokens;

/// Which API a call went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Chat,
    Responses,
    Embeddings,
    Messages,
}

impl Api {
    /// The record's endpoint.
    pub fn endpoint(self) -> &'static str {
        match self {
            Api::Chat => "openai.chat.completions",
            Api::Responses => "openai.responses",
            Api::Embeddings => "openai.embeddings",
            Api::Messages => "anthropic.messages",
        }
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The usage in a whole (not streamed) answer, if it has one.
pub fn of_answer(api: Api, body: &Value) -> Option<Tokens> {
    let u = body.get("usage").filter(|u| u.is_object())?;
    Some(match api {
        Api::Chat | Api::Embeddings => openai_chat(u),
        Api::Responses => openai_responses(u),
        Api::Messages => {
            let mut acc = MessagesUsage::default();
            acc.overwrite(u);
            acc.tokens()
        }
    })
}

/// OpenAI chat and embeddings: `prompt_tokens` includes the cached ones,
/// `completion_tokens` the reasoning ones.
fn openai_chat(u: &Value) -> Tokens {
    Tokens {
        cached_input: n(&u["prompt_tokens_details"]["cached_tokens"]),
        reasoning: n(&u["completion_tokens_details"]["reasoning_tokens"]),
        ..Tokens::new(n(&u["prompt_tokens"]), n(&u["completion_tokens"]))
    }
}

/// OpenAI responses: `input_tokens` includes the cached ones, `output_tokens` the
/// reasoning ones.
fn openai_responses(u: &Value) -> Tokens {
    Tokens {
        cached_input: n(&u["input_tokens_details"]["cached_tokens"]),
        reasoning: n(&u["output_tokens_details"]["reasoning_tokens"]),
        ..Tokens::new(n(&u["input_tokens"]), n(&u["output_tokens"]))
    }
}

/// Anthropic's usage, as the stream tells it: `message_start` gives all the counts,
/// each `message_delta` the cumulative values of the ones it names (they replace, never
/// add). `input_tokens` excludes the cache reads and writes, which come on top of it;
/// `cache_creation.ephemeral_1h_input_tokens` is the 1-hour part of the cache writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessagesUsage {
    input: u64,
    cache_read: u64,
    cache_creation: u64,
    cache_creation_1h: u64,
    output: u64,
}

impl MessagesUsage {
    pub fn overwrite(&mut self, u: &Value) {
        for (key, field) in [
            ("input_tokens", &mut self.input),
            ("cache_read_input_tokens", &mut self.cache_read),
            ("cache_creation_input_tokens", &mut self.cache_creation),
            ("output_tokens", &mut self.output),
        ] {
            if let Some(v) = u.get(key).and_then(Value::as_u64) {
                *field = v;
            }
        }
        if let Some(v) = u
            .get("cache_creation")
            .and_then(|c| c.get("ephemeral_1h_input_tokens"))
            .and_then(Value::as_u64)
        {
            self.cache_creation_1h = v;
        }
    }

    /// spendguard's tokens: every prompt token is input; cache reads and cache writes (with
    /// their 1-hour part) are parts of it.
    pub fn tokens(&self) -> Tokens {
        Tokens {
            cached_input: self.cache_read,
            cache_creation: self.cache_creation,
            cache_creation_1h: self.cache_creation_1h,
            ..Tokens::new(
                self.input
                    .saturating_add(self.cache_read)
                    .saturating_add(self.cache_creation),
                self.output,
            )
        }
    }
}

/// What a stream has told about its usage so far.
#[derive(Debug)]
pub struct StreamUsage {
    api: Api,
    /// The final usage, once an event carrying it has passed.
    done: Option<Tokens>,
    /// Anthropic: what `message_start` and the deltas so far said.
    messages: Option<MessagesUsage>,
    /// The status the usage came with (`response.failed`: error).
    pub failed: bool,
}

/// What to do with one event of a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    /// The usage chunk the gateway asked for and the caller did not.
    Drop,
}

impl StreamUsage {
    pub fn new(api: Api) -> StreamUsage {
        StreamUsage {
            api,
            done: None,
            messages: None,
            failed: false,
        }
    }

    /// Reads one event (its whole text, blank line included). `hide_usage`: drop an
    /// OpenAI chat usage chunk (one without choices) rather than forward it.
    pub fn event(&mut self, event: &[u8], hide_usage: bool) -> Pass {
        // Only events that can carry usage are parsed.
        let needle: &[u8] = match self.api {
            Api::Chat | Api::Embeddings => b"\"usage\"",
            Api::Responses => b"\"response.",
            Api::Messages => b"\"message_",
        };
        if !contains(event, needle) {
            return Pass::Forward;
        }
        let Some(v) = data_json(event) else {
            return Pass::Forward;
        };
        match self.api {
            Api::Chat | Api::Embeddings => {
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    self.done = Some(openai_chat(u));
                    let no_choices = v
                        .get("choices")
                        .and_then(Value::as_array)
                        .is_none_or(|c| c.is_empty());
                    if hide_usage && no_choices {
                        return Pass::Drop;
                    }
                }
            }
            Api::Responses => {
                let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
                if matches!(
                    kind,
                    "response.completed" | "response.incomplete" | "response.failed"
                ) {
                    if let Some(u) = v["response"].get("usage").filter(|u| u.is_object()) {
                        self.done = Some(openai_responses(u));
                        self.failed = kind == "response.failed";
                    }
                }
            }
            Api::Messages => match v.get("type").and_then(Value::as_str) {
                Some("message_start") => {
                    let mut m = MessagesUsage::default();
                    m.overwrite(&v["message"]["usage"]);
                    self.messages = Some(m);
                }
                Some("message_delta") => {
                    let m = self.messages.get_or_insert_default();
                    m.overwrite(&v["usage"]);
                    self.done = Some(m.tokens());
                }
                _ => {}
            },
        }
        Pass::Forward
    }

    /// The final usage, if the stream got that far.
    pub fn finished(&self) -> Option<Tokens> {
        self.done
    }

    /// What is known of a stream that ended before its usage: Anthropic's input counts.
    pub fn partial(&self) -> Option<Tokens> {
        self.messages.map(|m| m.tokens())
    }
}

/// Whether `needle` occurs in `hay`.
pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The JSON of an event's `data:` lines, if it is JSON.
fn data_json(event: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
        }
    }
    serde_json::from_str(&data).ok()
}

/// Splits a byte stream into server-sent events, each with its terminating blank line.
#[derive(Debug, Default)]
pub struct Events {
    buf: BytesMut,
}

impl Events {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole event, if one has arrived.
    pub fn next_event(&mut self) -> Option<Bytes> {
        let end = event_end(&self.buf)?;
        Some(self.buf.split_to(end).freeze())
    }

    /// What is left at the end of the stream (an event without its blank line).
    pub fn rest(&mut self) -> Option<Bytes> {
        (!self.buf.is_empty()).then(|| self.buf.split().freeze())
    }
}

/// The end of the first event in `buf`: just past its blank line (`\n\n`, `\r\n\r\n` or
/// `\r\r`).
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        match buf[i] {
            b'\n' if buf.get(i + 1) == Some(&b'\n') => return Some(i + 2),
            b'\r'
                if buf.get(i + 1) == Some(&b'\n')
                    && buf.get(i + 2) == Some(&b'\r')
                    && buf.get(i + 3) == Some(&b'\n') =>
            {
                return Some(i + 4);
            }
            b'\r' if buf.get(i + 1) == Some(&b'\r') => return Some(i + 2),
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_are_split_at_blank_lines_across_chunks() {
        let mut e = Events::default();
        e.push(b"data: {\"a\":");
        assert_eq!(e.next_event(), None);
        e.push(b"1}\n\ndata: [DONE]\r\n\r\nevent: x\n");
        assert_eq!(e.next_event().unwrap(), &b"data: {\"a\":1}\n\n"[..]);
        assert_eq!(e.next_event().unwrap(), &b"data: [DONE]\r\n\r\n"[..]);
        assert_eq!(e.next_event(), None);
        assert_eq!(e.rest().unwrap(), &b"event: x\n"[..]);
    }

    #[test]
    fn anthropic_deltas_overwrite_and_cache_counts_come_on_top_of_input() {
        let mut s = StreamUsage::new(Api::Messages);
        let start = json!({"type": "message_start", "message": {"usage": {
            "input_tokens": 10, "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 5, "output_tokens": 1,
            "cache_creation": {"ephemeral_5m_input_tokens": 3, "ephemeral_1h_input_tokens": 2}}}});
        s.event(
            format!("event: message_start\ndata: {start}\n\n").as_bytes(),
            false,
        );
        assert_eq!(s.finished(), None);
        for out in [20, 30] {
            let d = json!({"type": "message_delta", "usage": {"output_tokens": out}});
            s.event(
                format!("event: message_delta\ndata: {d}\n\n").as_bytes(),
                false,
            );
        }
        assert_eq!(
            s.finished(),
            Some(Tokens {
                input: 115,
                cached_input: 100,
                output: 30,
                cache_creation: 5,
                cache_creation_1h: 2,
                reasoning: 0,
            })
        );
    }

    #[test]
    fn an_openai_usage_chunk_is_dropped_only_when_hidden() {
        let chunk = json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 2},
            "completion_tokens_details": {"reasoning_tokens": 1}}});
        let event = format!("data: {chunk}\n\n");
        let mut s = StreamUsage::new(Api::Chat);
        assert_eq!(s.event(event.as_bytes(), true), Pass::Drop);
        assert_eq!(
            s.finished(),
            Some(Tokens {
                input: 7,
                cached_input: 2,
                output: 3,
                reasoning: 1,
                ..Tokens::default()
            })
        );
        let mut s = StreamUsage::new(Api::Chat);
        assert_eq!(s.event(event.as_bytes(), false), Pass::Forward);
    }

    #[test]
    fn openai_responses_reasoning_tokens_are_read() {
        let body = json!({"usage": {"input_tokens": 50, "output_tokens": 40,
            "input_tokens_details": {"cached_tokens": 10},
            "output_tokens_details": {"reasoning_tokens": 25}}});
        assert_eq!(
            of_answer(Api::Responses, &body),
            Some(Tokens {
                input: 50,
                cached_input: 10,
                output: 40,
                reasoning: 25,
                ..Tokens::default()
            })
        );
    }
}
