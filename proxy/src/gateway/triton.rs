//! A request forwarded to a `protocol = "triton"` backend: the body sent
//! upstream is Triton's generate request, and the answer is turned back into
//! OpenAI's shapes before metering and the client see it, so everything
//! downstream of this file handles a Triton answer as an OpenAI one
//! (the usage chunk included: Triton reports none, so it is computed here).

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use tollgate_backends::protocol::triton::{self, AnswerMeta, Exchange, StreamTranscoder};
use tollgate_metering::tokens::Encoding;

use super::request::InferenceRequest;
use crate::error::ApiError;

/// One attempt's translation state (a retry on another backend starts anew).
pub struct TritonCall {
    /// Triton's path, e.g. `/v2/models/llama/generate_stream`.
    pub path: String,
    /// The generate body sent upstream.
    pub body: Bytes,
    exchange: Exchange,
    meta: AnswerMeta,
    answer: Answer,
}

enum Answer {
    /// No header from the backend yet.
    Pending,
    /// A 200 stream, transcoded chunk by chunk.
    Stream(StreamTranscoder),
    /// A whole answer (or an error), buffered up to `limit` and translated
    /// once at its end.
    Whole { status: u16, buffer: Vec<u8> },
}

impl TritonCall {
    /// Translates the request as it would go upstream (with the gateway's
    /// rewrites: `max_tokens`, `stream_options`). `prompt_tokens` is the
    /// gateway's count, `encoding` counts the completion.
    pub fn new(
        request: &mut InferenceRequest,
        request_id: &str,
        prompt_tokens: u64,
        encoding: Encoding,
    ) -> Result<Self, ApiError> {
        let translated = triton::translate_request(request.endpoint, request.json())
            .map_err(|e| ApiError::bad_request(e.message, e.param))?;
        let prefix = request.endpoint.answer_id_prefix();
        Ok(Self {
            path: translated.path,
            body: Bytes::from(translated.body),
            exchange: translated.exchange,
            meta: AnswerMeta {
                id: format!("{prefix}-{request_id}"),
                created: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                model: request.model.clone(),
                prompt_tokens,
                encoding,
            },
            answer: Answer::Pending,
        })
    }

    /// The backend's header arrived: the client's answer is OpenAI JSON or
    /// SSE of a length only known at its end.
    pub fn response_started(&mut self, response: &mut ResponseHeader) -> pingora::Result<()> {
        let status = response.status.as_u16();
        let stream = status == 200 && self.exchange.stream;
        self.answer = if stream {
            Answer::Stream(StreamTranscoder::new(self.exchange, &self.meta))
        } else {
            Answer::Whole {
                status,
                buffer: Vec::new(),
            }
        };
        let content_type = if stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        response.insert_header(header::CONTENT_TYPE, content_type)?;
        response.remove_header(&header::CONTENT_LENGTH);
        response.insert_header(header::TRANSFER_ENCODING, "chunked")?;
        Ok(())
    }

    /// One chunk of Triton's answer; replaced by what the client gets.
    pub fn response_chunk(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) {
        let chunk = body.take().unwrap_or_default();
        let out = match &mut self.answer {
            Answer::Pending => chunk.to_vec(),
            Answer::Stream(transcoder) => {
                let mut out = transcoder.feed(&chunk);
                if end_of_stream {
                    out.extend(transcoder.finish());
                }
                out
            }
            Answer::Whole { status, buffer } => {
                // Bounded like the transcoder's text: a backend that sends
                // more is broken, and the translation reports it.
                if buffer.len() + chunk.len() <= tollgate_metering::capture::MAX_TEXT_BYTES {
                    buffer.extend_from_slice(&chunk);
                }
                if !end_of_stream {
                    return;
                }
                if *status == 200 {
                    match triton::translate_response(self.exchange, &self.meta, buffer) {
                        Ok(answer) => answer.body,
                        Err(error) => error.openai_body(),
                    }
                } else {
                    triton::translate_error(*status, buffer).openai_body()
                }
            }
        };
        *body = (!out.is_empty()).then(|| Bytes::from(out));
    }
}
