//! `content.process`: text operations on items (docs/content.md). The items are the input's, or
//! the lines of a JSONL artifact of an earlier job of the namespace (read through
//! [`ArtifactReader`]); the operations are [`crate::content`]'s pure functions, run on a
//! blocking thread a thousand items at a time, with progress and cancellation between batches.

use std::sync::Arc;

use async_trait::async_trait;
use capibara_shared::domain::{
    content::{
        ArtifactRef, ContentItem, ContentProcessInput, ContentProcessOutput, Operation,
        MAX_ARTIFACT_BYTES, MAX_ARTIFACT_ITEMS, MAX_EMBED_ITEMS,
    },
    job::JobError,
    kinds::input,
};
use uuid::Uuid;

use super::embed::model_error;
use super::{
    builtin::{invalid, to_output},
    ExecError, Executor, JobContext, Output,
};
use crate::{
    content::{self, Options},
    models::encoder::SharedEncoder,
};

/// Items processed between two progress reports (and checks for cancellation).
pub const BATCH: usize = 1000;
/// The same, when `embed` is asked for.
pub const EMBED_BATCH: usize = 100;

/// Why an artifact could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// No such job in the namespace, no such artifact of it, or gone from the store.
    NotFound(String),
    /// Longer than the most that is read (its size in bytes).
    TooLarge(u64),
    /// The database or the artifact store failed; another attempt may succeed.
    Unavailable(String),
    /// The artifact store cannot read it here (not configured, or another store's artifact).
    Unreadable(String),
}

/// What the executor needs of the store: the bytes of an earlier job's artifact.
#[async_trait]
pub trait ArtifactReader: Send + Sync {
    /// The artifact `name` of job `job_id` of `namespace` (a job of another namespace is not
    /// found), if it is at most `max_bytes` long.
    async fn read(
        &self,
        namespace: &str,
        job_id: Uuid,
        name: &str,
        max_bytes: u64,
    ) -> Result<Vec<u8>, ReadError>;
}

pub struct ContentProcess {
    pub artifacts: Arc<dyn ArtifactReader>,
    /// For the `embed` operation (the process's encoder, shared with `text.embed`).
    pub encoder: Arc<SharedEncoder>,
}

fn abort(t: &str, m: impl Into<String>) -> ExecError {
    ExecError::Abort(JobError::new(t, m))
}

fn canceled() -> ExecError {
    abort("canceled", "content.process was canceled")
}

/// The items of a JSONL text: one JSON object per line (blank lines skipped), at most
/// [`MAX_ARTIFACT_ITEMS`]; fields other than an item's are ignored.
pub fn parse_jsonl(name: &str, bytes: &[u8]) -> Result<Vec<ContentItem>, ExecError> {
    let mut items = Vec::new();
    for (n, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        if items.len() == MAX_ARTIFACT_ITEMS {
            return Err(abort(
                "too_many_items",
                format!("`{name}` has more than {MAX_ARTIFACT_ITEMS} items"),
            ));
        }
        let item = serde_json::from_slice(line).map_err(|e| {
            abort(
                "invalid_artifact",
                format!("`{name}` line {}: not an item ({e})", n + 1),
            )
        })?;
        items.push(item);
    }
    Ok(items)
}

impl ContentProcess {
    async fn load(&self, namespace: &str, a: &ArtifactRef) -> Result<Vec<ContentItem>, ExecError> {
        let bytes = self
            .artifacts
            .read(namespace, a.job_id, &a.name, MAX_ARTIFACT_BYTES)
            .await
            .map_err(|e| match e {
                ReadError::NotFound(m) => abort("artifact_not_found", m),
                ReadError::TooLarge(size) => abort(
                    "artifact_too_large",
                    format!(
                        "`{}` is {size} bytes; content.process reads at most {MAX_ARTIFACT_BYTES}",
                        a.name
                    ),
                ),
                ReadError::Unavailable(m) => {
                    ExecError::Retryable(JobError::new("artifact_store", m))
                }
                ReadError::Unreadable(m) => abort("artifact_store", m),
            })?;
        let name = a.name.clone();
        tokio::task::spawn_blocking(move || parse_jsonl(&name, &bytes))
            .await
            .map_err(|e| abort("executor_error", e.to_string()))?
    }
}

#[async_trait]
impl Executor for ContentProcess {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input: ContentProcessInput = input::parse(&ctx.input).map_err(invalid)?;
        let ops = input.operations();
        let options = Options {
            max_keywords: input.max_keywords(),
            summary_sentences: input.summary_sentences(),
        };
        let items = match (input.items, &input.artifact) {
            (Some(items), _) => items,
            (None, Some(a)) => self.load(&ctx.job.namespace, a).await?,
            (None, None) => return Err(abort("invalid_input", "input: no items")),
        };
        let total = items.len();
        if ops.contains(&Operation::Embed) && total > MAX_EMBED_ITEMS {
            return Err(abort(
                "too_many_items",
                format!("`embed` takes at most {MAX_EMBED_ITEMS} items; the artifact has {total}"),
            ));
        }
        let items = Arc::new(items);
        // The model is slow next to the pure functions: report and check more often.
        let batch_size = if ops.contains(&Operation::Embed) {
            EMBED_BATCH
        } else {
            BATCH
        };
        let mut results = Vec::with_capacity(total);
        let mut start = 0;
        while start < total {
            if ctx.cancel.is_cancelled() {
                return Err(canceled());
            }
            let end = (start + batch_size).min(total);
            let (batch, batch_ops) = (items.clone(), ops.clone());
            let run = tokio::task::spawn_blocking(move || {
                content::process(&batch[start..end], &batch_ops, &options)
            });
            let done = tokio::select! {
                r = run => r.map_err(|e| abort("executor_error", e.to_string()))?,
                _ = ctx.cancel.cancelled() => return Err(canceled()),
            };
            let mut done = done;
            if ops.contains(&Operation::Embed) {
                // The model's work, off the pure functions' thread; a cancel stops it between
                // batches.
                let texts: Vec<String> =
                    items[start..end].iter().map(content::plain_text).collect();
                let vectors = tokio::select! {
                    r = self.encoder.embed(texts) => r.map_err(model_error)?,
                    _ = ctx.cancel.cancelled() => return Err(canceled()),
                };
                for (r, e) in done.iter_mut().zip(vectors) {
                    r.embedding = Some(e.vector);
                }
            }
            results.extend(done);
            if end < total {
                let percent = (end as f64 / total as f64 * 1000.0).round() / 10.0;
                ctx.progress
                    .progress(Some(percent), Some(format!("{end} of {total} items")))
                    .await;
            }
            start = end;
        }
        Ok(Output {
            output: to_output(ContentProcessOutput {
                items: results,
                processed: total as u64,
            }),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, HashMap},
        sync::Mutex,
    };

    use capibara_shared::domain::job::{Job, Priority, Submission};
    use serde_json::{json, Value};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::executors::ProgressSink;

    /// Progress reports, kept.
    #[derive(Default)]
    struct Reports(Mutex<Vec<(Option<f64>, Option<String>)>>);

    #[async_trait]
    impl ProgressSink for Reports {
        async fn progress_with_data(&self, p: Option<f64>, m: Option<String>, _: Option<Value>) {
            self.0.lock().unwrap().push((p, m));
        }
        async fn output_chunk(&self, _: u64, _: Value) {}
        async fn log(&self, _: &str, _: String) {}
    }

    /// Artifacts by (namespace, job, name).
    #[derive(Default)]
    struct Artifacts(HashMap<(String, Uuid, String), Vec<u8>>);

    #[async_trait]
    impl ArtifactReader for Artifacts {
        async fn read(
            &self,
            namespace: &str,
            job_id: Uuid,
            name: &str,
            max_bytes: u64,
        ) -> Result<Vec<u8>, ReadError> {
            let b = self
                .0
                .get(&(namespace.to_string(), job_id, name.to_string()))
                .ok_or_else(|| ReadError::NotFound(format!("no artifact {name} of {job_id}")))?;
            if b.len() as u64 > max_bytes {
                return Err(ReadError::TooLarge(b.len() as u64));
            }
            Ok(b.clone())
        }
    }

    fn ctx(input: Value, progress: Arc<Reports>, cancel: CancellationToken) -> JobContext {
        let submission = Submission {
            kind: "content.process".into(),
            input: input.clone(),
            queue: "default".into(),
            priority: Priority::Normal,
            run_at: None,
            max_attempts: 1,
            timeout_s: None,
            backoff: None,
            callback_url: None,
            callback_events: None,
            tags: BTreeMap::new(),
            run_id: None,
            step_id: None,
            secret_refs: None,
            expires_at: None,
            ttl_s: None,
            deadline_s: None,
            ordering_key: None,
            debounce_key: None,
            traceparent: None,
        };
        let id = Uuid::now_v7();
        JobContext {
            job_id: id,
            kind: "content.process".into(),
            attempt: 1,
            max_attempts: 1,
            input,
            job: Arc::new(Job::submitted(
                id,
                "ns",
                &submission,
                capibara_shared::domain::now(),
            )),
            cancel,
            progress,
        }
    }

    async fn run(exec: &ContentProcess, input: Value) -> (Result<Output, ExecError>, Arc<Reports>) {
        let reports = Arc::new(Reports::default());
        let r = exec
            .execute(ctx(input, reports.clone(), CancellationToken::new()))
            .await;
        (r, reports)
    }

    fn error_type(r: Result<Output, ExecError>) -> String {
        match r {
            Err(ExecError::Abort(e)) | Err(ExecError::Retryable(e)) => e.error_type,
            other => panic!("{other:?}"),
        }
    }

    fn encoder() -> Arc<SharedEncoder> {
        let assets = std::env::var_os("CAPIBARA_ASSETS_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.capibara/assets")
            });
        Arc::new(SharedEncoder::new(&assets))
    }

    fn no_artifacts() -> ContentProcess {
        ContentProcess {
            artifacts: Arc::new(Artifacts::default()),
            encoder: encoder(),
        }
    }

    #[tokio::test]
    async fn embed_gives_each_item_the_vector_text_embed_gives_its_text() {
        let exec = no_artifacts();
        let (r, _) = run(
            &exec,
            json!({"items": [{"id": "a", "html": "<p>The invoice was <b>paid</b>.</p>"},
                             {"id": "b", "text": "Penguins swim."}],
                   "operations": ["embed", "stats"]}),
        )
        .await;
        let out: ContentProcessOutput = serde_json::from_value(r.unwrap().output).unwrap();
        let direct = exec
            .encoder
            .embed(vec![
                "The invoice was paid.".into(),
                "Penguins swim.".into(),
            ])
            .await
            .unwrap();
        for (item, e) in out.items.iter().zip(&direct) {
            assert_eq!(item.embedding.as_ref().unwrap(), &e.vector);
            assert!(item.stats.is_some());
        }
        assert!(out.items[0].language.is_none(), "only what was asked for");
    }

    #[tokio::test]
    async fn inline_items_get_one_result_each() {
        let input = json!({
            "items": [
                {"id": "en", "content": "<p>The library opens at nine. Children read books \
                    there every morning.</p>", "hash": "ignored"},
                {"id": "de", "text": "Die Bibliothek öffnet um neun Uhr. Kinder lesen dort \
                    jeden Morgen Bücher."},
            ],
            "operations": ["language", "stats", "html_to_text"],
        });
        let (r, reports) = run(&no_artifacts(), input).await;
        let out = r.unwrap().output;
        assert_eq!(out["processed"], 2);
        let items = out["items"].as_array().unwrap();
        assert_eq!(items[0]["id"], "en");
        assert_eq!(items[0]["language"]["code"], "eng");
        assert_eq!(items[1]["language"]["code"], "deu");
        assert_eq!(items[0]["stats"]["sentences"], 2);
        assert_eq!(
            items[0]["text"],
            "The library opens at nine. Children read books there every morning."
        );
        assert!(items[0].get("keywords").is_none());
        assert!(
            reports.0.lock().unwrap().is_empty(),
            "small inputs report no progress"
        );
        let parsed: ContentProcessOutput = serde_json::from_value(out).unwrap();
        assert_eq!(parsed.items.len(), 2);
    }

    #[tokio::test]
    async fn big_inputs_report_progress_and_stop_when_canceled() {
        let items: Vec<Value> = (0..2500)
            .map(|i| json!({"id": i.to_string(), "text": "One sentence. And another one."}))
            .collect();
        let input = json!({"items": items, "operations": ["stats"]});
        let (r, reports) = run(&no_artifacts(), input.clone()).await;
        assert_eq!(r.unwrap().output["processed"], 2500);
        let reports = reports.0.lock().unwrap().clone();
        assert_eq!(
            reports,
            [
                (Some(40.0), Some("1000 of 2500 items".to_string())),
                (Some(80.0), Some("2000 of 2500 items".to_string())),
            ]
        );
        let cancel = CancellationToken::new();
        cancel.cancel();
        let r = no_artifacts()
            .execute(ctx(input, Arc::new(Reports::default()), cancel))
            .await;
        assert_eq!(error_type(r), "canceled");
    }

    #[tokio::test]
    async fn an_artifact_of_the_namespace_is_read_line_by_line() {
        let job = Uuid::now_v7();
        let jsonl = concat!(
            r#"{"id":"a","hash":"h1","title":"T","content":"<p>Hello <b>there</b>.</p>","authors":["x"]}"#,
            "\n\n",
            r#"{"id":"b","hash":"h2","summary":"Plain summary."}"#,
            "\n"
        );
        let mut store = Artifacts::default();
        store.0.insert(
            ("ns".into(), job, "items.jsonl".into()),
            jsonl.as_bytes().to_vec(),
        );
        store.0.insert(
            ("ns".into(), job, "bad.jsonl".into()),
            b"{\"id\":1}\n".to_vec(),
        );
        store
            .0
            .insert(("other".into(), job, "x.jsonl".into()), b"{}\n".to_vec());
        let exec = ContentProcess {
            encoder: encoder(),
            artifacts: Arc::new(store),
        };
        let input = |name: &str| json!({"artifact": {"job_id": job, "name": name}, "operations": ["html_to_text"]});
        let (r, _) = run(&exec, input("items.jsonl")).await;
        let out = r.unwrap().output;
        assert_eq!(
            out,
            json!({"items": [{"id": "a", "text": "Hello there."},
                             {"id": "b", "text": "Plain summary."}], "processed": 2})
        );
        assert_eq!(
            error_type(run(&exec, input("bad.jsonl")).await.0),
            "invalid_artifact"
        );
        // Another namespace's artifact is not found.
        assert_eq!(
            error_type(run(&exec, input("x.jsonl")).await.0),
            "artifact_not_found"
        );
        assert_eq!(
            error_type(run(&exec, input("nope.jsonl")).await.0),
            "artifact_not_found"
        );
    }

    #[tokio::test]
    async fn refused_inputs_fail_without_retries() {
        let input = json!({"items": [{"text": "x"}], "operations": ["classify"]});
        match run(&no_artifacts(), input).await.0 {
            Err(ExecError::Abort(e)) => {
                assert_eq!(e.error_type, "invalid_input");
                assert!(
                    e.message.starts_with("input.operations[0]:"),
                    "{}",
                    e.message
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn jsonl_lines_are_items_and_their_number_is_bounded() {
        let items = parse_jsonl("a", b"{\"text\":\"x\"}\r\n  \n{\"html\":\"<p>y</p>\"}").unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].html.as_deref(), Some("<p>y</p>"));
        let many = "{}\n".repeat(MAX_ARTIFACT_ITEMS + 1);
        assert_eq!(
            error_type(parse_jsonl("a", many.as_bytes()).map(|_| Output::default())),
            "too_many_items"
        );
        assert_eq!(
            error_type(parse_jsonl("a", b"[1]\n").map(|_| Output::default())),
            "invalid_artifact"
        );
    }
}
