//! The wire format: OpenAI-shaped requests and responses, and the JSON error body every
//! failure answers with. Requests are parsed strictly: a wrong type or an unknown field is
//! a 400 that names it.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// An answer that is not a success: a status and a message, sent as
/// `{"error": {"message", "type", "code"}}` (the OpenAI error shape).
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status (4xx for the client's fault, 5xx for ours).
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// Seconds after which a retry may succeed (sent as `Retry-After`, with 429 and 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400: the request is malformed or asks for something this server does not do.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 413: an input is over a limit.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, message)
    }

    /// 429: the queue is full; retry after a second.
    pub fn overloaded(queue: usize) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("the server is busy: its queue of {queue} requests is full; retry later"),
            )
        }
    }

    /// 503: the server is shutting down.
    pub fn shutting_down() -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            )
        }
    }

    /// 500: the model failed on a valid request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// The OpenAI error `type` of this status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            429 => "rate_limit_error",
            503 => "server_shutting_down",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "code": self.status.as_u16(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_response(self.status, &self.body());
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// `value` as a JSON response with `status`.
pub fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            bytes,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "application/json")],
            format!(r#"{{"error":{{"message":"cannot encode the response: {e}","type":"server_error","code":500}}}}"#),
        )
            .into_response(),
    }
}

/// Parses a request body strictly, as a 400 naming the position and the problem.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the request body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// One string or a list of strings (`input` of embeddings, `stop` of completions).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single string.
    One(String),
    /// A list of strings.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The strings, in order.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsRequest {
    /// A sentence or a list of sentences (token-id inputs are not accepted).
    pub input: OneOrMany,
    /// Ignored: the server serves one model (the response names it).
    #[serde(default)]
    pub model: Option<String>,
    /// Only `"float"` is supported.
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Ignored (an OpenAI field for abuse tracking).
    #[serde(default)]
    pub user: Option<String>,
    /// Cut over-long inputs to the limit instead of answering 413 (a formers extension).
    #[serde(default)]
    pub truncate: bool,
}

/// One vector of an embeddings response.
#[derive(Debug, Clone, Serialize)]
pub struct Embedding {
    /// Always `"embedding"`.
    pub object: &'static str,
    /// Position of its input in the request.
    pub index: usize,
    /// The vector (L2-normalised when the checkpoint's pooling says so).
    pub embedding: Vec<f32>,
}

/// Token counts of a response.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// Tokens of the inputs (special tokens included).
    pub prompt_tokens: usize,
    /// Generated tokens (completions only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<usize>,
    /// All tokens.
    pub total_tokens: usize,
}

/// The answer to `POST /v1/embeddings`.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingsResponse {
    /// Always `"list"`.
    pub object: &'static str,
    /// One vector per input, in order.
    pub data: Vec<Embedding>,
    /// The served model's name.
    pub model: String,
    /// Token counts.
    pub usage: Usage,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionsRequest {
    /// The text to continue (one string; a list must hold exactly one).
    pub prompt: OneOrMany,
    /// Ignored: the server serves one model (the response names it).
    #[serde(default)]
    pub model: Option<String>,
    /// Tokens to generate at most [default 16].
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Softmax temperature; 0 takes the most likely token (greedy) [default 1].
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches `top_p`.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Sampler seed [default 0].
    #[serde(default)]
    pub seed: Option<u64>,
    /// Text at which generation stops (not included in the answer); up to 4.
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    /// Send the text as server-sent events, piece by piece, then `data: [DONE]`.
    #[serde(default)]
    pub stream: bool,
    /// Completions per prompt: only 1 is supported.
    #[serde(default)]
    pub n: Option<usize>,
    /// Ignored (an OpenAI field for abuse tracking).
    #[serde(default)]
    pub user: Option<String>,
}

/// One choice of a completion (or a piece of one, when streaming).
#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    /// The generated text (a piece of it, when streaming).
    pub text: String,
    /// Always 0 (one choice per request).
    pub index: usize,
    /// Always null.
    pub logprobs: Option<()>,
    /// `"stop"` (a stop sequence), `"length"` (`max_tokens`), or null while streaming.
    pub finish_reason: Option<&'static str>,
}

/// The answer to `POST /v1/completions`, and each event of a stream.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionsResponse {
    /// `cmpl-` and a number unique in this process.
    pub id: String,
    /// Always `"text_completion"`.
    pub object: &'static str,
    /// Unix time of the request, in seconds.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// One choice.
    pub choices: Vec<Choice>,
    /// Token counts (left out of stream events but the last).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}
