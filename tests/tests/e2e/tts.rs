//! `tts.render` end to end with the real default voice (en_US joe, from deploy/fetch-assets.sh):
//! the artifact, ranged downloads, per-sentence chunk events, the WebSocket, validation and
//! cancellation. Noise scales are 0 where lengths are compared, so the audio is deterministic.

use std::time::Duration;

use base64::Engine as _;
use capibara_tests::{eventually, parse_sse, types, Api, TestEnv};
use capibara_tts::audio::{parse_wav, rms};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};

/// Speech has an RMS well above this (joe speaks at about -19 dBFS, RMS 0.11); silence is 0.
const SILENCE_RMS: f64 = 0.02;

async fn tts(api: &Api, body: Value) -> capibara_tests::Res {
    api.send(
        api.http
            .post(api.url("/v1/tts"))
            .header("Prefer", "wait=60")
            .json(&body),
    )
    .await
}

async fn download(api: &Api, path: &str, range: Option<&str>) -> reqwest::Response {
    let mut req = api.http.get(api.url(path)).bearer_auth(&api.key);
    if let Some(r) = range {
        req = req.header("Range", r);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn hello_world_becomes_a_wav_of_speech_served_with_ranges() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let r = tts(
        &api,
        json!({"text": "Hello world", "noise_scale": 0, "noise_w": 0}),
    )
    .await;

    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["status"], "succeeded");
    let out = &r.body["output"];
    assert_eq!(out["sample_rate"], 22050);
    assert_eq!(out["voice"], "en_US-joe-medium");
    assert_eq!(out["format"], "wav");
    assert!(out["chars_per_second"].as_f64().unwrap() > 0.0);
    let audio_url = r.body["audio_url"].as_str().unwrap().to_string();
    let id = r.body["job_id"].as_str().unwrap();
    assert_eq!(audio_url, format!("/v1/jobs/{id}/artifacts/audio.wav"));

    let res = download(&api, &audio_url, None).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "audio/wav");
    assert_eq!(res.headers()["accept-ranges"], "bytes");
    let bytes = res.bytes().await.unwrap();
    let wav = parse_wav(&bytes).expect("a WAV file");
    assert_eq!((wav.sample_rate, wav.channels), (22050, 1));
    let secs = wav.duration_s();
    assert!((0.5..=3.0).contains(&secs), "{secs} s of audio");
    assert!((secs - out["duration_s"].as_f64().unwrap()).abs() < 0.01);
    assert!(rms(&wav.samples) > SILENCE_RMS, "rms {}", rms(&wav.samples));
    let size = bytes.len();
    assert_eq!(r.body["job"]["artifacts"][0]["size"], size);

    // The header alone, the last ten bytes, and a range past the end.
    let head = download(&api, &audio_url, Some("bytes=0-43")).await;
    assert_eq!(head.status(), 206);
    assert_eq!(
        head.headers()["content-range"],
        format!("bytes 0-43/{size}").as_str()
    );
    let head = head.bytes().await.unwrap();
    assert_eq!((head.len(), &head[0..4]), (44, &b"RIFF"[..]));
    let tail = download(&api, &audio_url, Some("bytes=-10")).await;
    assert_eq!(tail.status(), 206);
    assert_eq!(tail.bytes().await.unwrap(), bytes[size - 10..]);
    let past = download(&api, &audio_url, Some(&format!("bytes={size}-"))).await;
    assert_eq!(past.status(), 416);
    assert_eq!(
        past.headers()["content-range"],
        format!("bytes */{size}").as_str()
    );
    let missing = download(&api, &format!("/v1/jobs/{id}/artifacts/other.wav"), None).await;
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn voices_are_listed_with_the_default_and_the_espeak_fallback() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();

    let r = api.get("/v1/tts/voices").await;

    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["default"], "en_US-joe-medium");
    let items = r.body["items"].as_array().unwrap();
    let joe = items
        .iter()
        .find(|v| v["name"] == "en_US-joe-medium")
        .expect("joe is listed");
    assert_eq!(
        (&joe["engine"], &joe["sample_rate"], &joe["default"]),
        (&json!("piper"), &json!(22050), &json!(true))
    );
    assert!(items
        .iter()
        .any(|v| v["name"] == "espeak:en-us" && v["engine"] == "espeak"));
}

#[tokio::test]
async fn bad_text_voices_and_parameters_are_422_problems_naming_the_field() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let long = "a".repeat(20_001);

    let cases = [
        (json!({"text": ""}), "text"),
        (json!({"text": "   "}), "text"),
        (json!({}), "text"),
        (json!({"text": long}), "text"),
        (json!({"text": "Hi", "voice": "no_such-voice"}), "voice"),
        (json!({"text": "Hi", "speed": 10}), "speed"),
        (json!({"text": "Hi", "noise_scale": -1}), "noise_scale"),
        (json!({"text": "Hi", "format": "mp3"}), "format"),
        (json!({"text": "Hi", "sample_rate": 100}), "sample_rate"),
        (json!({"text": "Hi", "pitch": 3}), "pitch"),
    ];
    for (body, field) in cases {
        let r = api
            .send(
                api.http
                    .post(api.url("/v1/tts"))
                    .json(&body)
                    .header("Prefer", "wait=1"),
            )
            .await;
        assert_eq!(r.status, 422, "{body} -> {r:?}");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/problem+json")
        );
        assert_eq!(r.body["errors"][0]["field"], field, "{body} -> {r:?}");
    }

    // An Idempotency-Key replay returns the same job (no worker here: it stays queued).
    let keyed = || {
        api.http
            .post(api.url("/v1/tts"))
            .header("Prefer", "wait=0")
            .header("Idempotency-Key", "tts-once")
            .json(&json!({"text": "Only once."}))
    };
    let first = api.send(keyed()).await;
    let again = api.send(keyed()).await;
    assert_eq!((first.status, again.status), (202, 202), "{first:?}");
    assert_eq!(first.body["job_id"], again.body["job_id"]);

    // The job API checks the same input under `input.`.
    let r = api
        .submit(json!({"kind": "tts.render", "input": {"text": "Hi", "format": "ogg"}}))
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["errors"][0]["field"], "input.format");
}

#[tokio::test]
async fn each_sentence_is_a_chunk_event_recorded_before_the_job_succeeds() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let text = "The first sentence is short. The second one is a little longer than that. \
                And this is the third.";

    let id = api
        .submit_id(json!({"kind": "tts.render",
            "input": {"text": text, "noise_scale": 0, "noise_w": 0}}))
        .await;
    // Follow the job over SSE until it ends (the stream closes after the terminal event).
    let sse = api
        .http
        .get(api.url(&format!("/v1/jobs/{id}/events")))
        .bearer_auth(&api.key)
        .header("Accept", "text/event-stream")
        .timeout(Duration::from_secs(90))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    let events: Vec<(String, Value)> = parse_sse(&sse)
        .into_iter()
        .map(|(_, event, data)| (event, data))
        .collect();
    let kinds: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(kinds.last(), Some(&"JobSucceeded"), "{kinds:?}");
    let chunks: Vec<&Value> = events
        .iter()
        .filter(|(t, _)| t == "JobOutputChunk")
        .map(|(_, e)| &e["data"])
        .collect();
    assert_eq!(chunks.len(), 3, "{kinds:?}");
    let mut total_samples = 0;
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c["seq"], i);
        let d = &c["data"];
        assert_eq!((&d["index"], &d["total"]), (&json!(i), &json!(3)));
        let audio = base64::engine::general_purpose::STANDARD
            .decode(d["audio"].as_str().unwrap())
            .unwrap();
        let wav = parse_wav(&audio).expect("each chunk is a WAV segment");
        assert!(rms(&wav.samples) > SILENCE_RMS);
        total_samples += wav.samples.len();
    }
    assert_eq!(chunks[0]["data"]["text"], "The first sentence is short.");
    // The first sentence was recorded before the last one and before the job succeeded.
    let first = kinds.iter().position(|t| *t == "JobOutputChunk").unwrap();
    let succeeded = kinds.iter().position(|t| *t == "JobSucceeded").unwrap();
    assert!(first < succeeded);
    // The artifact is the chunks joined.
    let job = api.job(&id).await;
    let bytes = download(&api, &format!("/v1/jobs/{id}/artifacts/audio.wav"), None)
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(parse_wav(&bytes).unwrap().samples.len(), total_samples);
    assert_eq!(job["output"]["sentences"], 3);
}

#[tokio::test]
async fn canceling_a_job_mid_paragraph_stops_rendering() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let paragraph: String = (1..=60)
        .map(|i| format!("This is sentence number {i} of a long paragraph that takes a while. "))
        .collect();

    let id = api
        .submit_id(json!({"kind": "tts.render", "input": {"text": paragraph}}))
        .await;
    eventually(
        "the first sentence is rendered",
        Duration::from_secs(60),
        || async {
            types(&api.events(&id).await)
                .iter()
                .any(|t| t == "JobOutputChunk")
                .then_some(())
        },
    )
    .await;
    let r = api.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert!(r.status == 200 || r.status == 202, "{r:?}");
    let job = api.wait_terminal(&id, Duration::from_secs(30)).await;

    assert_eq!(job["status"], "canceled", "{job}");
    let count = |evs: &[Value]| types(evs).iter().filter(|t| *t == "JobOutputChunk").count();
    let rendered = count(&api.events(&id).await);
    assert!(
        (1..60).contains(&rendered),
        "{rendered} of 60 sentences rendered"
    );
    // Nothing more is rendered after the cancel took effect.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&api.events(&id).await), rendered);
    assert!(job["artifacts"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn the_websocket_streams_one_frame_per_sentence_then_completes() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let url = format!("ws://127.0.0.1:{}/v1/tts/stream", env.api_port);
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", api.key).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();

    let request = json!({"text": "Good morning. How are you today?", "streaming": true,
        "noise_scale": 0, "noise_w": 0});
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        request.to_string().into(),
    ))
    .await
    .unwrap();

    let mut frames = Vec::new();
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(60), ws.next())
        .await
        .expect("a frame within a minute")
    {
        let text = msg.unwrap().into_text().unwrap().to_string();
        let frame: Value = serde_json::from_str(&text).unwrap();
        let done = frame["status"] != "streaming";
        frames.push(frame);
        if done {
            break;
        }
    }
    assert_eq!(frames.len(), 3, "{frames:?}");
    for (i, f) in frames[..2].iter().enumerate() {
        assert_eq!(f["status"], "streaming");
        assert_eq!((&f["chunk_id"], &f["total_chunks"]), (&json!(i), &json!(2)));
        let audio = base64::engine::general_purpose::STANDARD
            .decode(f["audio_data"].as_str().unwrap())
            .unwrap();
        assert!(rms(&parse_wav(&audio).unwrap().samples) > SILENCE_RMS);
    }
    assert_eq!(frames[2]["status"], "complete", "{:?}", frames[2]);

    // A bad request on the same socket is answered with an error frame naming the field.
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        json!({"text": "", "streaming": true}).to_string().into(),
    ))
    .await
    .unwrap();
    let msg = ws.next().await.unwrap().unwrap().into_text().unwrap();
    let frame: Value = serde_json::from_str(&msg).unwrap();
    assert_eq!(frame["status"], "error");
    assert_eq!(frame["error"]["errors"][0]["field"], "text");
}

#[tokio::test]
async fn raw_pcm_at_another_sample_rate() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let r = tts(
        &api,
        json!({"text": "Raw samples, please.", "format": "pcm_s16le", "sample_rate": 16000}),
    )
    .await;

    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["output"]["sample_rate"], 16000);
    let res = download(&api, r.body["audio_url"].as_str().unwrap(), None).await;
    assert_eq!(
        res.headers()["content-type"],
        "audio/L16; rate=16000; channels=1"
    );
    let bytes = res.bytes().await.unwrap();
    let secs = bytes.len() as f64 / 2.0 / 16000.0;
    assert!((secs - r.body["output"]["duration_s"].as_f64().unwrap()).abs() < 0.01);
    let samples: Vec<i16> = bytes
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    assert!(rms(&samples) > SILENCE_RMS);
}

#[tokio::test]
async fn a_worker_without_the_voice_fails_the_job_and_post_tts_answers_422() {
    let mut env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    // This worker's voices directory is empty: only espeak voices exist for it.
    let empty = std::env::temp_dir().join(format!("capibara-no-voices-{}", env.api_port));
    std::fs::create_dir_all(&empty).unwrap();
    env.extra_env.push((
        "CAPIBARA_TTS_VOICES_DIR".into(),
        empty.display().to_string(),
    ));
    let _worker = env.spawn_worker(&[]);
    let api = env.client();

    let r = tts(&api, json!({"text": "Hello.", "voice": "en_US-joe-medium"})).await;

    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(r.body["errors"][0]["field"], "voice");
    // The espeak voice works anywhere.
    let r = tts(&api, json!({"text": "Hello.", "voice": "espeak:en-us"})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["output"]["engine"], "espeak");
    std::fs::remove_dir_all(&empty).ok();
}

#[tokio::test]
async fn tts_render_is_a_workflow_step_whose_output_feeds_the_next_step() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let def = json!({"name": "speak-and-report", "steps": [
        {"id": "speak", "kind": "tts.render", "input": {"text": "{{ input.greeting }}"}},
        {"id": "report", "kind": "echo", "depends_on": ["speak"],
         "input": {"seconds": "{{ steps.speak.output.duration_s }}",
                   "voice": "{{ steps.speak.output.voice }}"}}
    ]});
    let r = api.post("/v1/workflows", def).await;
    assert_eq!(r.status, 201, "{r:?}");
    let workflow = r.body["id"].as_str().unwrap().to_string();

    let r = api
        .post(
            &format!("/v1/workflows/{workflow}/runs"),
            json!({"input": {"greeting": "Good evening, and welcome."}}),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let run = r.body["id"].as_str().unwrap().to_string();
    let ended = eventually("the run to end", Duration::from_secs(90), || async {
        let r = api.get(&format!("/v1/runs/{run}")).await;
        let s = r.body["status"].as_str().unwrap_or_default().to_string();
        ["succeeded", "failed", "canceled"]
            .contains(&s.as_str())
            .then_some(r.body)
    })
    .await;

    assert_eq!(ended["status"], "succeeded", "{ended}");
    let step = |id: &str| {
        ended["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .cloned()
            .unwrap()
    };
    let speak = step("speak");
    assert_eq!(speak["output"]["sample_rate"], 22050);
    let seconds = step("report")["output"]["seconds"].as_f64().unwrap();
    assert_eq!(seconds, speak["output"]["duration_s"].as_f64().unwrap());
    assert!(seconds > 0.5, "{seconds}");
    // The step's job kept its artifact.
    let job = speak["job_id"].as_str().unwrap();
    let wav = download(&api, &format!("/v1/jobs/{job}/artifacts/audio.wav"), None)
        .await
        .bytes()
        .await
        .unwrap();
    assert!(rms(&parse_wav(&wav).unwrap().samples) > SILENCE_RMS);
}

#[tokio::test]
async fn the_worker_loads_the_default_voice_before_the_first_request() {
    let mut env = TestEnv::new().await;
    let wport = capibara_tests::find_free_port();
    env.extra_env
        .push(("CAPIBARA_WORKER_ADDR".into(), format!("127.0.0.1:{wport}")));
    let _procs = env.spawn_all().await;
    let api = env.client();
    let worker = format!("http://127.0.0.1:{wport}");
    capibara_tests::wait_http_ok(&format!("{worker}/healthz")).await;
    let http = reqwest::Client::new();
    // `/readyz` says 503 `tts_voice: loading` until the voice is loaded, then 200 `ok`.
    let ready = eventually("the voice ready", Duration::from_secs(60), || async {
        let r = http.get(format!("{worker}/readyz")).send().await.unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        if status == 503 {
            assert_eq!(body["checks"]["tts_voice"], "loading", "{body}");
        }
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(ready["tts_voice"], "ok", "{ready}");

    let r = tts(&api, json!({"text": "The first request. It is warm."})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["output"]["voice"], "en_US-joe-medium");
    assert_eq!(
        r.body["output"]["model_loaded"], false,
        "the first job used the model loaded at start: {}",
        r.body["output"]
    );
    let metrics = capibara_tests::scrape(&worker).await;
    assert!(
        metrics.contains("capibara_tts_model_loads_total{during=\"warm_up\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("capibara_tts_model_loads_total{during=\"job\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("capibara_tts_voice_ready 1"), "{metrics}");
}
