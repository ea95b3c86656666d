//! `/v1/responses`: OpenAI's Responses API as vLLM and trtllm-serve serve
//! it. One output message of generated text; `usage` in the Responses
//! API's names (`input_tokens`, `output_tokens`). Streamed, it is a series
//! of typed events (`response.created`, `response.output_text.delta` per
//! token, …, `response.completed` carrying the whole response and its
//! usage), with no `[DONE]`; a stream cut off ends with an `error` event.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::request::{ResponsesRequest, parse_body};
use super::response::response_id;
use super::unix_now;
use crate::sim::engine::{Engine, Generation, GenerationRequest};
use crate::sim::error::SimError;
use crate::sim::stream::{StreamFormat, sse_response};

pub async fn responses(
    State(engine): State<Arc<Engine>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, SimError> {
    engine.check_ready()?;
    let request = {
        let body: Value = parse_body(&body?)?;
        ResponsesRequest::parse(&engine, &body)?
    };
    let generation = engine
        .start(GenerationRequest {
            model: &request.model,
            prompt_tokens: request.prompt_tokens,
            sequences: request.plan(&engine.options),
        })
        .await?;
    let answer = ResponseObject {
        id: response_id("resp"),
        message_id: response_id("msg"),
        created_at: unix_now(),
        model: request.model,
        report_usage: !engine.options.no_usage,
    };
    if request.stream {
        return Ok(sse_response(
            generation,
            ResponseEvents {
                answer,
                sequence_number: 0,
            },
        ));
    }
    generation.finish().await;
    Ok(Json(answer.whole(&generation, "completed")).into_response())
}

/// What every form of the answer shares.
struct ResponseObject {
    id: String,
    message_id: String,
    created_at: u64,
    model: String,
    report_usage: bool,
}

impl ResponseObject {
    /// The response object: in progress (no output yet) or finished.
    fn whole(&self, generation: &Generation, status: &str) -> Value {
        let done = status != "in_progress";
        let output: Vec<Value> = if done {
            generation
                .sequences
                .first()
                .map(|completion| vec![self.message(&completion.text())])
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut response = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": output,
            "error": null,
            "incomplete_details": null,
        });
        if done && self.report_usage {
            let (input, output) = (generation.prompt_tokens, generation.completion_tokens());
            response["usage"] = json!({
                "input_tokens": input,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input + output,
            });
        }
        response
    }

    fn message(&self, text: &str) -> Value {
        json!({
            "type": "message",
            "id": self.message_id,
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        })
    }
}

/// The stream's events, each `event: TYPE` and `data: {"type": TYPE, …}`.
struct ResponseEvents {
    answer: ResponseObject,
    sequence_number: u64,
}

impl ResponseEvents {
    fn event(&mut self, kind: &str, mut data: Value, out: &mut String) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence_number);
        self.sequence_number += 1;
        let _ = write!(out, "event: {kind}\ndata: {data}\n\n");
    }

    fn part_ids(&self) -> Value {
        json!({"item_id": self.answer.message_id, "output_index": 0, "content_index": 0})
    }
}

impl StreamFormat for ResponseEvents {
    fn opening(&mut self, generation: &Generation, out: &mut String) {
        let response = self.answer.whole(generation, "in_progress");
        self.event("response.created", json!({"response": response}), out);
        let mut item = self.answer.message("");
        item["status"] = json!("in_progress");
        item["content"] = json!([]);
        self.event(
            "response.output_item.added",
            json!({"output_index": 0, "item": item}),
            out,
        );
        let mut part = self.part_ids();
        part["part"] = json!({"type": "output_text", "text": "", "annotations": []});
        self.event("response.content_part.added", part, out);
    }

    fn token(&mut self, generation: &Generation, sequence: usize, token: usize, out: &mut String) {
        let Some(completion) = generation.sequences.get(sequence) else {
            return;
        };
        let mut delta = self.part_ids();
        delta["delta"] = json!(completion.piece(token));
        self.event("response.output_text.delta", delta, out);
    }

    fn finished(&mut self, generation: &Generation, sequence: usize, out: &mut String) {
        let text = generation
            .sequences
            .get(sequence)
            .map(|completion| completion.text())
            .unwrap_or_default();
        let mut done = self.part_ids();
        done["text"] = json!(text);
        self.event("response.output_text.done", done, out);
        let mut part = self.part_ids();
        part["part"] = json!({"type": "output_text", "text": text, "annotations": []});
        self.event("response.content_part.done", part, out);
        let item = self.answer.message(&text);
        self.event(
            "response.output_item.done",
            json!({"output_index": 0, "item": item}),
            out,
        );
    }

    fn closing(&mut self, generation: &Generation, out: &mut String) {
        let response = self.answer.whole(generation, "completed");
        self.event("response.completed", json!({"response": response}), out);
    }

    fn aborted(&self, out: &mut String) -> bool {
        // The sequence number of an abort is not tracked (`&self`): OpenAI's
        // error events carry one, but clients do not depend on it.
        out.push_str(
            "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\
             \"message\":\"The model stopped generating (simulated abort).\",\"param\":null}\n\n",
        );
        true
    }
}
