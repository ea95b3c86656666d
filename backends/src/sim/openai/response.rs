//! The objects an answer is made of: choices, assistant messages, tool calls,
//! log probabilities and usage, shaped as vLLM's OpenAI server writes them.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use super::request::ToolCall;
use crate::sim::generate::{Completion, FinishReason, mix};

#[derive(Serialize)]
pub struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

/// A response id unique within this process and unlikely to repeat across
/// processes; ids, unlike the text, need not be reproducible.
pub fn response_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "{prefix}-{:016x}",
        mix(n ^ (u64::from(std::process::id()) << 32))
    )
}

/// The id of one tool call; vLLM names them `chatcmpl-tool-…`.
pub fn tool_call_id() -> String {
    response_id("chatcmpl-tool")
}

/// How the choices of one answer are written; fixed for the request.
pub struct ChoiceStyle {
    /// Log probabilities per token: chat `top_logprobs` (when `logprobs` is
    /// true) or completions `logprobs`.
    pub logprobs: Option<usize>,
    /// Chat: every choice calls this function instead of answering in text.
    pub tool_call: Option<ToolCall>,
}

impl ChoiceStyle {
    /// A choice's `finish_reason`. A tool call forced by `"required"` that
    /// ends by itself finishes with `tool_calls`; a named one with `stop`,
    /// as OpenAI and vLLM do; a cut one with `length`.
    pub fn finish_reason(&self, completion: &Completion) -> &'static str {
        match (&self.tool_call, completion.finish_reason) {
            (Some(call), FinishReason::Stop) if !call.named => "tool_calls",
            (_, reason) => reason.as_str(),
        }
    }

    /// One choice of a `chat.completion`.
    pub fn chat_choice(&self, index: usize, completion: &Completion) -> ChatChoice {
        let text = completion.text();
        let (content, tool_calls) = match &self.tool_call {
            // vLLM answers a forced tool call with empty content.
            Some(call) => (
                String::new(),
                vec![ToolCallObject {
                    id: tool_call_id(),
                    kind: "function",
                    function: FunctionCall {
                        name: call.name.clone(),
                        arguments: text,
                    },
                }],
            ),
            None => (text, Vec::new()),
        };
        ChatChoice {
            index,
            message: AssistantMessage {
                role: "assistant",
                content,
                tool_calls,
            },
            logprobs: self.chat_logprobs(completion, 0..completion.len()),
            finish_reason: self.finish_reason(completion),
        }
    }

    /// One choice of a `text_completion`.
    pub fn text_choice(&self, index: usize, completion: &Completion) -> TextChoice {
        TextChoice {
            index,
            text: completion.text(),
            logprobs: self.completion_logprobs(completion, 0..completion.len(), 0),
            finish_reason: self.finish_reason(completion),
        }
    }

    /// Chat `logprobs` of `tokens`: per token its log probability and the
    /// `top_logprobs` most likely tokens (the token itself first, since the
    /// simulator always generates the most likely one).
    pub fn chat_logprobs(
        &self,
        completion: &Completion,
        tokens: Range<usize>,
    ) -> Option<ChatLogprobs> {
        let top = self.logprobs?;
        let content = tokens
            .map(|i| {
                let ranked = completion.ranked_logprobs(i, top.saturating_sub(1));
                let (token, logprob) = ranked.first().cloned().unwrap_or_default();
                ChatTokenLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob,
                    top_logprobs: ranked
                        .into_iter()
                        .take(top)
                        .map(|(token, logprob)| ChatTopLogprob {
                            bytes: token.as_bytes().to_vec(),
                            token,
                            logprob,
                        })
                        .collect(),
                }
            })
            .collect();
        Some(ChatLogprobs { content })
    }

    /// Completions `logprobs` of `tokens`, the first of which starts
    /// `text_offset` characters into the choice's text. `top_logprobs` holds
    /// `logprobs` entries, at least the generated token (vLLM adds it when
    /// `logprobs` is 0).
    pub fn completion_logprobs(
        &self,
        completion: &Completion,
        tokens: Range<usize>,
        mut text_offset: usize,
    ) -> Option<CompletionLogprobs> {
        let top = self.logprobs?.max(1);
        let mut logprobs = CompletionLogprobs::default();
        for i in tokens {
            let ranked = completion.ranked_logprobs(i, top - 1);
            let (token, logprob) = ranked.first().cloned().unwrap_or_default();
            logprobs.text_offset.push(text_offset);
            // vLLM's offsets count characters, as Python's `len` does.
            text_offset += token.chars().count();
            logprobs.tokens.push(token);
            logprobs.token_logprobs.push(logprob);
            logprobs.top_logprobs.push(TopLogprobs(ranked));
        }
        Some(logprobs)
    }
}

#[derive(Serialize)]
pub struct ChatChoice {
    index: usize,
    message: AssistantMessage,
    logprobs: Option<ChatLogprobs>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage {
    role: &'static str,
    content: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallObject>,
}

#[derive(Serialize)]
struct ToolCallObject {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionCall,
}

#[derive(Serialize)]
struct FunctionCall {
    name: String,
    arguments: String,
}

#[derive(Serialize)]
pub struct TextChoice {
    index: usize,
    text: String,
    logprobs: Option<CompletionLogprobs>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
pub struct ChatLogprobs {
    content: Vec<ChatTokenLogprob>,
}

#[derive(Serialize)]
struct ChatTokenLogprob {
    token: String,
    logprob: f64,
    bytes: Vec<u8>,
    top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Serialize)]
struct ChatTopLogprob {
    token: String,
    logprob: f64,
    bytes: Vec<u8>,
}

#[derive(Serialize, Default)]
pub struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f64>,
    top_logprobs: Vec<TopLogprobs>,
    text_offset: Vec<usize>,
}

/// One token's `top_logprobs`: an object from token to log probability, most
/// likely first.
struct TopLogprobs(Vec<(String, f64)>);

impl Serialize for TopLogprobs {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}
