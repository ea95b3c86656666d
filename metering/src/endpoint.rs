//! The OpenAI inference endpoints Tollgate serves and meters: one vocabulary
//! for the gateway's routes and metrics, the usage event's `kind`, the Triton
//! translation and gpu-sim's answers.

use serde::{Deserialize, Serialize};

use crate::units::UnitKind;

/// One OpenAI inference endpoint. Serialised (in usage events, the spool and
/// the usage log's `kind` column) by [`Endpoint::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    #[serde(rename = "chat")]
    ChatCompletions,
    /// `POST /v1/completions` (legacy text completions).
    #[serde(rename = "completion")]
    Completions,
    /// `POST /v1/embeddings`.
    #[serde(rename = "embedding")]
    Embeddings,
    /// `POST /v1/responses`: OpenAI's Responses API (vLLM, trtllm-serve).
    #[serde(rename = "response")]
    Responses,
    /// `POST /v1/images/generations`.
    #[serde(rename = "image")]
    ImageGenerations,
    /// `POST /v1/images/edits`: images from an uploaded image and a prompt.
    #[serde(rename = "image_edit")]
    ImageEdits,
    /// `POST /v1/audio/speech`: text to speech.
    #[serde(rename = "speech")]
    Speech,
    /// `POST /v1/audio/transcriptions`: speech to text, from an upload.
    #[serde(rename = "transcription")]
    Transcription,
    /// `POST /v1/audio/translations`: speech to English text, from an upload.
    #[serde(rename = "translation")]
    Translation,
    /// A custom GPU route (`[[routes]]`): any path, forwarded as it came.
    #[serde(rename = "custom")]
    Custom,
}

impl Endpoint {
    pub const ALL: [Self; 10] = [
        Self::ChatCompletions,
        Self::Completions,
        Self::Embeddings,
        Self::Responses,
        Self::ImageGenerations,
        Self::ImageEdits,
        Self::Speech,
        Self::Transcription,
        Self::Translation,
        Self::Custom,
    ];

    /// The canonical OpenAI path, which backends are asked on; `None` for a
    /// custom route, whose requests keep their own path.
    pub fn path(self) -> Option<&'static str> {
        Some(match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
            Self::Responses => "/v1/responses",
            Self::ImageGenerations => "/v1/images/generations",
            Self::ImageEdits => "/v1/images/edits",
            Self::Speech => "/v1/audio/speech",
            Self::Transcription => "/v1/audio/transcriptions",
            Self::Translation => "/v1/audio/translations",
            Self::Custom => return None,
        })
    }

    /// What kind of work it is, as usage events and the usage log name it.
    pub fn kind(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat",
            Self::Completions => "completion",
            Self::Embeddings => "embedding",
            Self::Responses => "response",
            Self::ImageGenerations => "image",
            Self::ImageEdits => "image_edit",
            Self::Speech => "speech",
            Self::Transcription => "transcription",
            Self::Translation => "translation",
            Self::Custom => "custom",
        }
    }

    /// The `endpoint` label of the request metrics.
    pub fn metric_label(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
            Self::ImageGenerations => "images_generations",
            Self::ImageEdits => "images_edits",
            Self::Speech => "audio_speech",
            Self::Transcription => "audio_transcriptions",
            Self::Translation => "audio_translations",
            Self::Custom => "custom",
        }
    }

    /// What the endpoint's work is billed in; a custom route names its own.
    pub fn unit_kind(self) -> UnitKind {
        match self {
            Self::ChatCompletions | Self::Completions | Self::Embeddings | Self::Responses => {
                UnitKind::Tokens
            }
            Self::ImageGenerations | Self::ImageEdits => UnitKind::Images,
            Self::Speech => UnitKind::Characters,
            Self::Transcription | Self::Translation => UnitKind::AudioSeconds,
            Self::Custom => UnitKind::Requests,
        }
    }

    /// Whether the answer is JSON (or a stream of JSON events), which
    /// metering reads; speech answers with audio bytes, a custom route with
    /// whatever its server sends, a transcription in the format asked for
    /// (JSON, text, SRT, VTT).
    pub fn answers_json(self) -> bool {
        !matches!(
            self,
            Self::Speech | Self::Transcription | Self::Translation | Self::Custom
        )
    }

    /// Whether the request is a `multipart/form-data` upload (an audio
    /// file, images to edit) rather than JSON.
    pub fn takes_upload(self) -> bool {
        matches!(
            self,
            Self::Transcription | Self::Translation | Self::ImageEdits
        )
    }

    /// Whether the endpoint generates text (and so takes a completion limit).
    pub fn generates(self) -> bool {
        matches!(
            self,
            Self::ChatCompletions | Self::Completions | Self::Responses
        )
    }

    /// Whether a stream reports usage only when asked
    /// (`stream_options.include_usage`, chat and completions); a Responses
    /// stream always ends with its usage, in `response.completed`.
    pub fn usage_on_request(self) -> bool {
        matches!(self, Self::ChatCompletions | Self::Completions)
    }

    /// The prefix of the `id` of a text answer (`chatcmpl-…`, `cmpl-…`);
    /// images and speech answers carry no id.
    pub fn answer_id_prefix(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chatcmpl",
            Self::Completions => "cmpl",
            Self::Embeddings => "embd",
            Self::Responses => "resp",
            Self::ImageGenerations | Self::ImageEdits => "img",
            Self::Speech => "speech",
            Self::Transcription => "transcription",
            Self::Translation => "translation",
            Self::Custom => "custom",
        }
    }

    /// The `object` of a text answer, or of one streamed chunk of it (legacy
    /// completions' chunks keep `text_completion`); images answers carry
    /// none and are lists, speech answers are audio.
    pub fn answer_object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Self::ChatCompletions, false) => "chat.completion",
            (Self::ChatCompletions, true) => "chat.completion.chunk",
            (Self::Completions, _) => "text_completion",
            (Self::Responses, _) => "response",
            (
                Self::Embeddings
                | Self::ImageGenerations
                | Self::ImageEdits
                | Self::Speech
                | Self::Transcription
                | Self::Translation
                | Self::Custom,
                _,
            ) => "list",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Endpoint;

    #[test]
    fn serialised_as_the_usage_logs_kind() {
        for endpoint in Endpoint::ALL {
            let json = serde_json::to_string(&endpoint).unwrap();
            assert_eq!(json, format!("\"{}\"", endpoint.kind()));
            assert_eq!(serde_json::from_str::<Endpoint>(&json).unwrap(), endpoint);
        }
    }
}
