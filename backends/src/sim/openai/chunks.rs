//! OpenAI's streamed answer, as vLLM streams it: for chat a role chunk per
//! choice, then one chunk per token per choice (the choices interleave, each
//! chunk carrying its choice's `index`), a finish chunk per choice, the usage
//! chunk when `stream_options.include_usage` asks for it, and `data: [DONE]`.

use std::fmt::Write as _;

use super::response::{ChoiceStyle, Usage, tool_call_id};
use super::{Answer, Endpoint, json_string};
use crate::sim::engine::Generation;
use crate::sim::stream::StreamFormat;

pub struct OpenAiChunks {
    endpoint: Endpoint,
    /// Every chunk starts the same way; written once.
    chunk_prefix: String,
    chunk_suffix: &'static str,
    include_usage: bool,
    style: ChoiceStyle,
    /// Completions `logprobs`: characters of each choice streamed so far, the
    /// next token's `text_offset`.
    text_offsets: Vec<usize>,
}

impl OpenAiChunks {
    pub fn new(answer: &Answer, style: ChoiceStyle, include_usage: bool) -> Self {
        let include_usage = include_usage && answer.report_usage;
        let chunk_prefix = format!(
            "data: {{\"id\":\"{}\",\"object\":\"{}\",\"created\":{},\"model\":{},\"choices\":[",
            answer.id,
            answer.endpoint.answer_object(true),
            answer.created,
            json_string(&answer.model),
        );
        // OpenAI sends `"usage": null` on every chunk when usage was asked for.
        let chunk_suffix = if include_usage {
            "],\"usage\":null}\n\n"
        } else {
            "]}\n\n"
        };
        Self {
            endpoint: answer.endpoint,
            chunk_prefix,
            chunk_suffix,
            include_usage,
            style,
            text_offsets: Vec::new(),
        }
    }

    /// One chunk holding one choice: `body` is its `delta` or `text` member,
    /// `logprobs` its JSON.
    fn choice(
        &self,
        index: usize,
        body: &str,
        logprobs: &str,
        finish: Option<&str>,
        out: &mut String,
    ) {
        out.push_str(&self.chunk_prefix);
        let _ = write!(out, "{{\"index\":{index},{body},\"logprobs\":{logprobs},");
        match finish {
            Some(reason) => {
                let _ = write!(out, "\"finish_reason\":\"{reason}\"}}");
            }
            None => out.push_str("\"finish_reason\":null}"),
        }
        out.push_str(self.chunk_suffix);
    }
}

impl StreamFormat for OpenAiChunks {
    fn opening(&mut self, generation: &Generation, out: &mut String) {
        if self.endpoint == Endpoint::ChatCompletions {
            for index in 0..generation.sequences.len() {
                self.choice(
                    index,
                    "\"delta\":{\"role\":\"assistant\",\"content\":\"\"}",
                    "null",
                    None,
                    out,
                );
            }
        } else {
            self.text_offsets = vec![0; generation.sequences.len()];
        }
    }

    fn token(&mut self, generation: &Generation, sequence: usize, token: usize, out: &mut String) {
        let Some(completion) = generation.sequences.get(sequence) else {
            return;
        };
        let piece = completion.piece(token);
        let text = json_string(&piece);
        let (body, logprobs) = if self.endpoint == Endpoint::ChatCompletions {
            let body = match &self.style.tool_call {
                None => format!("\"delta\":{{\"content\":{text}}}"),
                // vLLM's first tool-call delta names the call, the rest
                // carry argument fragments.
                Some(call) if token == 0 => format!(
                    "\"delta\":{{\"tool_calls\":[{{\"index\":0,\"id\":\"{}\",\
                         \"type\":\"function\",\"function\":{{\"name\":{},\
                         \"arguments\":{text}}}}}]}}",
                    tool_call_id(),
                    json_string(&call.name),
                ),
                Some(_) => format!(
                    "\"delta\":{{\"tool_calls\":[{{\"index\":0,\
                         \"function\":{{\"arguments\":{text}}}}}]}}"
                ),
            };
            let logprobs = self
                .style
                .chat_logprobs(completion, token..token + 1)
                .and_then(|l| serde_json::to_string(&l).ok());
            (body, logprobs)
        } else {
            let offset = self.text_offsets.get(sequence).copied().unwrap_or(0);
            let logprobs = self
                .style
                .completion_logprobs(completion, token..token + 1, offset)
                .and_then(|l| serde_json::to_string(&l).ok());
            if let Some(offset) = self.text_offsets.get_mut(sequence) {
                *offset += piece.chars().count();
            }
            (format!("\"text\":{text}"), logprobs)
        };
        self.choice(
            sequence,
            &body,
            logprobs.as_deref().unwrap_or("null"),
            None,
            out,
        );
    }

    fn finished(&mut self, generation: &Generation, sequence: usize, out: &mut String) {
        let Some(completion) = generation.sequences.get(sequence) else {
            return;
        };
        let last = if self.endpoint == Endpoint::ChatCompletions {
            "\"delta\":{}"
        } else {
            "\"text\":\"\""
        };
        let finish = self.style.finish_reason(completion);
        self.choice(sequence, last, "null", Some(finish), out);
    }

    fn closing(&mut self, generation: &Generation, out: &mut String) {
        if self.include_usage {
            let usage = Usage::new(generation.prompt_tokens, generation.completion_tokens());
            let usage = serde_json::to_string(&usage).unwrap_or_default();
            out.push_str(&self.chunk_prefix);
            let _ = write!(out, "],\"usage\":{usage}}}\n\n");
        }
        out.push_str("data: [DONE]\n\n");
    }

    fn aborted(&self, _out: &mut String) -> bool {
        // An OpenAI stream has no abort event: the connection just drops.
        false
    }
}
