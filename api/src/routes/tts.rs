//! Text to speech on top of `tts.render` jobs: the voice list, `POST /v1/tts` (a job plus a
//! wait) and the seed-compatible WebSocket `GET /v1/tts/stream`.
//!
//! Voices are read from this server's voices directory (`CAPIBARA_TTS_VOICES_DIR`, default
//! `<assets>/voices`), which is expected to hold the same voices as the TTS workers' (docs/tts.md).
//! A voice that is not there is a 422 here, as for every `tts.render` job however it is
//! submitted (`kinds::validate_input`); a worker that lacks a voice fails the job with
//! `unknown_voice` (not retried), which `POST /v1/tts` also answers with a 422.

use std::time::Duration;

use axum::{
    extract::{
        ws::{Message, WebSocket, WebSocketUpgrade},
        State,
    },
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use capibara_shared::{
    domain::{auth::Role, job::Job, job::JobStatus},
    store,
};
use capibara_tts::voices::{self, VoiceInfo};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{
    auth::Auth,
    error::ApiError,
    extract::{idempotency_key, prefer_wait, ApiJson},
    routes::jobs::{create, rename_input, SubmitJob},
    AppState,
};

/// `GET /v1/tts/voices`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VoiceList {
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<VoiceInfo>,
    /// The voice a request without `voice` gets.
    pub default: String,
}

#[utoipa::path(get, operation_id = "listTtsVoices", path = "/v1/tts/voices", tag = "tts",
    responses((status = 200, description = "Piper voices in the voices directory, then espeak-ng's fallback", body = VoiceList)),
    security(("bearer" = [])))]
pub async fn voices(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<VoiceList>, ApiError> {
    auth.require(Role::Read)?;
    let dir = state.config.tts.voices_dir.clone();
    let items = tokio::task::spawn_blocking(move || voices::list(&dir))
        .await
        .map_err(ApiError::internal)?;
    let default = items
        .iter()
        .find(|v| v.default)
        .map(|v| v.name.clone())
        .unwrap_or_else(|| voices::ESPEAK_FALLBACK.into());
    Ok(Json(VoiceList { items, default }))
}

/// `POST /v1/tts` body and the WebSocket's request message: a `tts.render` input (plus
/// `streaming` for the WebSocket).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct TtsRequest {
    /// At most 20,000 characters.
    pub text: Option<Value>,
    pub voice: Option<String>,
    /// 0.25 – 4.0 (2.0 = twice as fast).
    pub speed: Option<f64>,
    /// 0 – 2; 0 makes the output deterministic.
    pub noise_scale: Option<f64>,
    pub noise_w: Option<f64>,
    /// `wav` (default) or `pcm_s16le`.
    pub format: Option<String>,
    /// 8,000 – 48,000 Hz (default: the voice's own).
    pub sample_rate: Option<u64>,
    /// WebSocket only: send one frame per sentence (default true).
    #[serde(default)]
    pub streaming: Option<bool>,
    /// Other fields are refused with a 422 naming them.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: serde_json::Map<String, Value>,
}

impl TtsRequest {
    /// The `tts.render` input. The job's submission checks it (`kinds::validate_input`, as
    /// for every job): an unknown voice is a 422 naming `voice`.
    fn to_input(&self) -> Result<Value, ApiError> {
        if let Some(k) = self.extra.keys().next() {
            return Err(ApiError::field(k.clone(), "unknown field"));
        }
        let mut input = serde_json::Map::new();
        if let Some(t) = &self.text {
            input.insert("text".into(), t.clone());
        }
        if let Some(v) = &self.voice {
            input.insert("voice".into(), json!(v));
        }
        for (k, v) in [
            ("speed", self.speed),
            ("noise_scale", self.noise_scale),
            ("noise_w", self.noise_w),
        ] {
            if let Some(v) = v {
                input.insert(k.into(), json!(v));
            }
        }
        if let Some(f) = &self.format {
            input.insert("format".into(), json!(f));
        }
        if let Some(r) = self.sample_rate {
            input.insert("sample_rate".into(), json!(r));
        }
        Ok(Value::Object(input))
    }
}

/// Create the `tts.render` job; with an idempotency key (`Idempotency-Key` on `POST /v1/tts`)
/// a replay returns the job the first request created.
async fn submit(
    state: &AppState,
    auth: &Auth,
    input: Value,
    key: Option<String>,
) -> Result<Job, ApiError> {
    let submission = SubmitJob::of("tts.render", input);
    // The request hash guards key reuse with another body: the input is that body.
    let hash = {
        use sha2::Digest;
        let canonical = serde_json::to_vec(submission.input.as_ref().unwrap_or(&Value::Null))
            .unwrap_or_default();
        hex::encode(sha2::Sha256::digest(canonical))
    };
    let (job, _) = create(state, auth, submission, key, &hash, "Tts")
        .await
        .map_err(|e| rename_input(e, ""))?;
    Ok(job)
}

/// `POST /v1/tts` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TtsResponse {
    /// `accepted` (still rendering), or the job's final status.
    pub status: String,
    pub job_id: Uuid,
    /// Where the audio is, once rendered.
    pub audio_url: String,
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    pub error: Option<capibara_shared::domain::job::JobError>,
    /// Where to poll.
    pub location: String,
    pub job: Job,
}

/// How long `POST /v1/tts` waits without a `Prefer: wait` header.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

#[utoipa::path(post, operation_id = "renderTts", path = "/v1/tts", tag = "tts", request_body = TtsRequest,
    params(("Prefer" = Option<String>, Header, description = "wait=N (≤ 60 s; default 30)"),
           ("Idempotency-Key" = Option<String>, Header, description = "replays return the same job")),
    responses((status = 200, description = "rendered; audio at audio_url", body = TtsResponse),
              (status = 202, description = "still rendering; poll location", body = TtsResponse),
              (status = 422, description = "bad text, voice or parameter (the field is named)", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn render(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    body: ApiJson<TtsRequest>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let wait = prefer_wait(&headers)?.unwrap_or(DEFAULT_WAIT);
    let req = body.value;
    if req.streaming.is_some() {
        return Err(ApiError::field(
            "streaming",
            "streaming is for GET /v1/tts/stream (WebSocket) or the job's SSE events",
        ));
    }
    let key = idempotency_key(&headers)?;
    let job = submit(&state, &auth, req.to_input()?, key).await?;
    let job = crate::wait::until_terminal(&state, auth.namespace(), job.id, wait)
        .await?
        .unwrap_or(job);
    if job.status == JobStatus::Failed {
        if let Some(e) = job
            .error
            .as_ref()
            .filter(|e| e.error_type == "unknown_voice")
        {
            return Err(ApiError::field("voice", e.message.clone()));
        }
    }
    let done = job.status.is_terminal();
    let name = job
        .artifacts
        .first()
        .map(|a| a.name.clone())
        .unwrap_or_else(|| "audio.wav".into());
    let body = TtsResponse {
        status: if done {
            job.status.to_string()
        } else {
            "accepted".into()
        },
        job_id: job.id,
        audio_url: format!("/v1/jobs/{}/artifacts/{name}", job.id),
        output: job.output.clone(),
        error: job.error.clone(),
        location: format!("/v1/jobs/{}", job.id),
        job,
    };
    let status = if done {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((
        status,
        [(header::LOCATION, body.location.clone())],
        Json(body),
    )
        .into_response())
}

#[utoipa::path(get, operation_id = "streamTts", path = "/v1/tts/stream", tag = "tts",
    responses((status = 101, description = "WebSocket: send {text, streaming: true, voice?, …}; receive \
        {status: \"streaming\", chunk_id, total_chunks, audio_data, …} per sentence, then {status: \"complete\"} \
        (or {status: \"error\", error})")),
    security(("bearer" = [])))]
pub async fn stream(
    State(state): State<AppState>,
    crate::stream_tokens::StreamAuth(auth): crate::stream_tokens::StreamAuth,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    Ok(ws.on_upgrade(move |socket| session(socket, state, auth)))
}

/// One WebSocket: requests one after another, each answered by its frames.
async fn session(mut socket: WebSocket, state: AppState, auth: Auth) {
    while let Some(Ok(msg)) = socket.recv().await {
        let text = match msg {
            Message::Text(t) => t.to_string(),
            Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
            Message::Close(_) => return,
            _ => continue,
        };
        let result = match serde_json::from_str::<TtsRequest>(&text) {
            Ok(req) => speak(&mut socket, &state, &auth, req).await,
            Err(e) => Err(json!({"status": "error", "error": {"type": "validation",
                "detail": format!("request is not a JSON object of the expected shape: {e}")}})),
        };
        match result {
            Ok(()) => {}
            Err(frame) if frame.is_null() => return, // the client went away
            Err(frame) => {
                if socket
                    .send(Message::Text(frame.to_string().into()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

fn error_frame(e: ApiError) -> Value {
    let (field_errors, detail) = match &e {
        ApiError::Validation { errors, detail } => (json!(errors), detail.clone()),
        other => (json!([]), other.to_string()),
    };
    json!({"status": "error", "error": {"detail": detail, "errors": field_errors}})
}

/// Render one request, relaying the job's chunk events as frames. `Err(Value::Null)` means the
/// socket is gone; other errors are a frame to send.
async fn speak(
    socket: &mut WebSocket,
    state: &AppState,
    auth: &Auth,
    req: TtsRequest,
) -> Result<(), Value> {
    let streaming = req.streaming.unwrap_or(true);
    let input = req.to_input().map_err(error_frame)?;
    let job = submit(state, auth, input, None)
        .await
        .map_err(error_frame)?;
    let send = |v: Value| Message::Text(v.to_string().into());
    let mut after = 0i64;
    let notify = state.watch.watch(job.id);
    let mut whole: Vec<Value> = Vec::new();
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let batch = store::events::read_stream(&state.store.pool, job.id, after, 500)
            .await
            .map_err(|e| error_frame(e.into()))?;
        for ev in batch {
            after = ev.position();
            match ev.event_type.as_str() {
                "JobOutputChunk" => {
                    let chunk = &ev.data["data"];
                    let frame = json!({
                        "status": "streaming",
                        "chunk_id": chunk["index"],
                        "total_chunks": chunk["total"],
                        "audio_data": chunk["audio"],
                        "format": chunk["format"],
                        "sample_rate": chunk["sample_rate"],
                        "text": chunk["text"],
                        "job_id": job.id,
                    });
                    if streaming {
                        socket.send(send(frame)).await.map_err(|_| Value::Null)?;
                    } else {
                        whole.push(frame);
                    }
                }
                "JobSucceeded" => {
                    let output = &ev.data["output"];
                    let mut done = json!({
                        "status": "complete",
                        "job_id": job.id,
                        "duration_s": output["duration_s"],
                        "sample_rate": output["sample_rate"],
                        "voice": output["voice"],
                        "audio_url": format!("/v1/jobs/{}/artifacts/{}", job.id,
                            output["artifact"].as_str().unwrap_or("audio.wav")),
                    });
                    if !streaming {
                        // One frame with the whole file, as the seed's non-streaming mode.
                        let audio = whole_audio(state, auth, job.id).await?;
                        done["audio_data"] = json!(audio);
                    }
                    socket.send(send(done)).await.map_err(|_| Value::Null)?;
                    return Ok(());
                }
                "JobFailed" | "JobCanceled" => {
                    return Err(json!({"status": "error", "job_id": job.id,
                        "error": ev.data.get("error").cloned().unwrap_or(json!({"code": "canceled"}))}));
                }
                _ => {}
            }
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The finished job's audio file, base64.
async fn whole_audio(state: &AppState, auth: &Auth, id: Uuid) -> Result<String, Value> {
    use base64::Engine as _;
    let job = store::jobs::get(&state.store.pool, auth.namespace(), id)
        .await
        .map_err(|e| error_frame(e.into()))?
        .ok_or_else(|| error_frame(ApiError::NotFound("job vanished".into())))?;
    let artifact = job
        .artifacts
        .first()
        .ok_or_else(|| error_frame(ApiError::Internal(anyhow::anyhow!("no artifact"))))?;
    let store = state
        .artifacts
        .as_ref()
        .map_err(|e| error_frame(ApiError::Internal(anyhow::anyhow!(e.clone()))))?;
    let read = store
        .get(&artifact.location, None)
        .await
        .map_err(|e| error_frame(ApiError::internal(e)))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(&read.bytes))
}

/// The OpenAPI paths of text to speech and artifacts (merged into the API's document).
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(voices, render, stream, crate::routes::artifacts::get),
    components(schemas(VoiceList, TtsRequest, TtsResponse)),
    tags((name = "tts"))
)]
pub struct TtsDoc;
