//! `capibara bench-tts`: how fast `tts.render` speaks (docs/tts.md, docs/benchmarks.md).
//!
//! In this process, with the engine the worker uses (one ONNX session, `--threads` intra-op
//! threads, the default voice, the voice's own noise settings):
//! 1. model load time (once per worker);
//! 2. real-time factor (render time / audio duration) over `--runs` renders of a ~3.4 s text;
//! 3. time to the first chunk of a three-sentence paragraph (what a streaming client waits),
//!    and of one whose first sentence has a clause break (where capibara-tts cuts the first
//!    chunk; piper-tts renders whole sentences);
//!
//! and, in the same run on the same voice, text and thread count, the `piper-tts` Python
//! package (installed into a venv under target/ on first use: `--python-venv`). Pin the whole
//! run to one core with `taskset -c 0` for the one-core figures. It prints figures; it is not a
//! test.

use std::{
    ops::ControlFlow,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use capibara_tts::{voices, Engine, EngineConfig, RenderOptions};
use clap::Args;
use serde_json::Value;

use crate::harness::{percentile, profile, sorted, Facts};

/// The sentence pair piper-tts was checked against (3.4 s of audio).
const TEXT: &str = "Hello world. This is a test of the Capibara speech worker.";
/// A three-sentence paragraph for time to first chunk.
const PARAGRAPH: &str = "The quick brown fox jumps over the lazy dog. Streaming lets a listener \
    hear this first sentence while the rest is still being rendered. That is the whole point.";
/// A paragraph whose first sentence has a clause break (three words or more on each side).
const PARAGRAPH_CLAUSE: &str = "Good evening and welcome, this is the evening news from the \
    Capibara newsroom. Streaming speech starts playing long before the whole text is rendered. \
    Stay with us.";

/// `capibara bench-tts` options.
#[derive(Args, Debug, Clone)]
pub struct TtsBenchArgs {
    /// Renders per measurement (after one warm-up).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// ONNX Runtime intra-op threads (the worker's CAPIBARA_TTS_THREADS).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Voice (default: the default voice).
    #[arg(long)]
    voice: Option<String>,
    /// Asset directory (default `CAPIBARA_ASSETS_DIR` or `.capibara/assets`).
    #[arg(long)]
    assets: Option<PathBuf>,
    /// Venv with piper-tts (created and filled from PyPI when missing).
    #[arg(long, default_value = "target/bench-tts/venv")]
    python_venv: PathBuf,
    /// Rounds alternating capibara-tts and piper-tts (runs are spread over them).
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Skip the piper-tts comparison.
    #[arg(long)]
    no_python: bool,
}

/// Median, best and p90 of samples.
fn stats(samples: Vec<f64>) -> (f64, f64, f64) {
    let s = sorted(samples);
    (percentile(&s, 0.5), s[0], percentile(&s, 0.9))
}

pub async fn run(a: TtsBenchArgs) -> Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(a)).await?
}

fn run_blocking(a: TtsBenchArgs) -> Result<()> {
    let runs = a.runs.max(1);
    let assets = a
        .assets
        .clone()
        .or_else(|| std::env::var_os("CAPIBARA_ASSETS_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(".capibara/assets"));
    let mut config = EngineConfig::from_assets_dir(&assets);
    config.intra_threads = a.threads.max(1);
    let engine = Engine::new(config.clone());
    let voice = a.voice.clone().unwrap_or_else(|| engine.default_voice());
    if voice.starts_with(voices::ESPEAK_PREFIX) {
        bail!(
            "no Piper voice in {}: run deploy/fetch-assets.sh",
            config.voices_dir.display()
        );
    }
    let facts = Facts::collect();
    let affinity = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Cpus_allowed_list:"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    println!(
        "capibara bench-tts ({} build, git {})",
        profile(),
        facts.git
    );
    println!(
        "machine: {}; this run may use CPUs {affinity}",
        facts.machine()
    );
    println!(
        "voice {voice}, {} intra-op thread(s), {runs} runs per measurement, {}",
        config.intra_threads, facts.date
    );

    let opts = RenderOptions {
        voice: Some(voice.clone()),
        ..Default::default()
    };
    let t = Instant::now();
    engine.preload(&voice)?;
    println!(
        "\nmodel load (once per worker): {:.2} s",
        t.elapsed().as_secs_f64()
    );

    let python = if a.no_python {
        None
    } else {
        match piper_python(&a.python_venv) {
            Ok(p) => Some(p),
            Err(e) => {
                println!("piper-tts comparison skipped: {e:#}");
                None
            }
        }
    };
    let model = voices::load_piper(&config.voices_dir, &voice)?.model;
    let script = a.python_venv.join("bench_piper.py");
    if python.is_some() {
        std::fs::write(&script, PYTHON_BENCH)?;
    }

    // Rounds alternate between the two so that load from other processes hits both alike.
    let rounds = a.rounds.clamp(1, runs);
    let per_round = runs.div_ceil(rounds);
    let mut rust = Samples::default();
    let mut py = Samples::default();
    let mut py_meta = Value::Null;
    render(&engine, &opts, TEXT)?; // warm-up
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for _ in 0..per_round {
            let (secs, _, dur) = render(&engine, &opts, TEXT)?;
            rust.render_s.push(secs);
            rust.audio_s = dur;
        }
        for _ in 0..per_round {
            let (secs, first, _) = render(&engine, &opts, PARAGRAPH)?;
            rust.first_ms.push(first);
            rust.paragraph_ms.push(secs * 1000.0);
        }
        for _ in 0..per_round {
            let (_, first, _) = render(&engine, &opts, PARAGRAPH_CLAUSE)?;
            rust.first_clause_ms.push(first);
        }
        if let Some(python) = &python {
            let out = Command::new(python)
                .arg(&script)
                .arg(&model)
                .arg(TEXT)
                .arg(PARAGRAPH)
                .arg(per_round.to_string())
                .arg(config.intra_threads.to_string())
                .arg(PARAGRAPH_CLAUSE)
                .output()
                .context("running the piper-tts benchmark")?;
            if !out.status.success() {
                bail!(
                    "piper-tts benchmark failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let r: Value =
                serde_json::from_slice(&out.stdout).context("piper-tts benchmark output")?;
            let list = |k: &str| -> Vec<f64> {
                r[k].as_array()
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default()
            };
            py.render_s.extend(list("render_s"));
            py.first_ms.extend(list("first_ms"));
            py.paragraph_ms.extend(list("paragraph_ms"));
            py.first_clause_ms.extend(list("first_clause_ms"));
            py.load_s.push(r["load_s"].as_f64().unwrap_or(f64::NAN));
            py.audio_s = r["audio_s"].as_f64().unwrap_or(f64::NAN);
            py_meta = r;
        }
    }

    println!("\ncapibara-tts (Rust, ort 2.0.0-rc.15, libonnxruntime 1.31.1):");
    let (r50, f50, c50) = rust.print();
    if python.is_some() {
        println!(
            "\npiper-tts {} (Python, onnxruntime {}), same voice, text and threads:",
            py_meta["piper_version"].as_str().unwrap_or("?"),
            py_meta["ort_version"].as_str().unwrap_or("?")
        );
        println!("  model load: {:.2} s (median)", stats(py.load_s.clone()).0);
        let (p50, pf50, pc50) = py.print();
        println!(
            "\ncapibara-tts / piper-tts: render time {:.2}x, first chunk {:.2}x, first chunk with a clause break {:.2}x (below 1 = capibara faster)",
            r50 / p50,
            f50 / pf50,
            c50 / pc50
        );
    }
    Ok(())
}

/// Measurements of one implementation.
#[derive(Default)]
struct Samples {
    render_s: Vec<f64>,
    audio_s: f64,
    first_ms: Vec<f64>,
    paragraph_ms: Vec<f64>,
    first_clause_ms: Vec<f64>,
    load_s: Vec<f64>,
}

impl Samples {
    /// Print the figures; returns the median render time (s), first chunk and first chunk of the
    /// paragraph with a clause break (ms).
    fn print(&self) -> (f64, f64, f64) {
        let (t50, tmin, t90) = stats(self.render_s.clone());
        let audio = self.audio_s;
        println!(
            "  render {audio:.2} s of audio ({} runs): median {:.0} ms (best {:.0}, p90 {:.0}) -> RTF {:.3} (best {:.3})",
            self.render_s.len(),
            t50 * 1000.0,
            tmin * 1000.0,
            t90 * 1000.0,
            t50 / audio,
            tmin / audio
        );
        let (f50, fmin, f90) = stats(self.first_ms.clone());
        let (p50, _, _) = stats(self.paragraph_ms.clone());
        println!(
            "  3-sentence paragraph: first chunk median {f50:.0} ms (best {fmin:.0}, p90 {f90:.0}); whole paragraph median {p50:.0} ms"
        );
        let (c50, cmin, c90) = stats(self.first_clause_ms.clone());
        println!(
            "  paragraph with a clause break in its first sentence: first chunk median {c50:.0} ms (best {cmin:.0}, p90 {c90:.0})"
        );
        (t50, f50, c50)
    }
}

/// One render: (seconds, ms to the first chunk, seconds of audio).
fn render(engine: &Engine, opts: &RenderOptions, text: &str) -> Result<(f64, f64, f64)> {
    let started = Instant::now();
    let mut first = None;
    let mut samples = 0usize;
    let mut rate = 1;
    engine.render(text, opts, |s| {
        first.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1000.0);
        samples += s.samples.len();
        rate = s.sample_rate;
        ControlFlow::Continue(())
    })?;
    Ok((
        started.elapsed().as_secs_f64(),
        first.unwrap_or(f64::NAN),
        samples as f64 / rate as f64,
    ))
}

/// The venv's python with piper-tts, installing it from PyPI when missing.
fn piper_python(venv: &Path) -> Result<PathBuf> {
    let python = venv.join("bin/python");
    let has_piper = |p: &Path| {
        p.exists()
            && Command::new(p)
                .args(["-c", "import piper"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
    };
    if has_piper(&python) {
        return Ok(python);
    }
    eprintln!("installing piper-tts 1.8.0 into {} …", venv.display());
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        && Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "piper-tts==1.8.0"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if !ok || !has_piper(&python) {
        bail!("could not install piper-tts into {}", venv.display());
    }
    Ok(python)
}

/// Same measurements with piper-tts: its own phonemizer and ONNX Runtime session, limited to
/// the same number of threads.
const PYTHON_BENCH: &str = r#"
import json, sys, time
import onnxruntime
import piper
from piper import PiperVoice
from importlib.metadata import version

model, text, paragraph, runs, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
paragraph_clause = sys.argv[6]
t = time.perf_counter()
voice = PiperVoice.load(model)
opts = onnxruntime.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
voice.session = onnxruntime.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - t

def render(s):
    start = time.perf_counter()
    first = None
    samples = 0
    rate = 1
    for chunk in voice.synthesize(s):
        if first is None:
            first = (time.perf_counter() - start) * 1000.0
        samples += len(chunk.audio_int16_bytes) // 2
        rate = chunk.sample_rate
    return time.perf_counter() - start, first, samples / rate

render(text)
times, audio = [], 0.0
for _ in range(runs):
    secs, _, audio = render(text)
    times.append(secs)
firsts, paras = [], []
for _ in range(runs):
    secs, first, _ = render(paragraph)
    firsts.append(first)
    paras.append(secs * 1000.0)
clause_firsts = []
for _ in range(runs):
    _, first, _ = render(paragraph_clause)
    clause_firsts.append(first)
print(json.dumps({
    "piper_version": version("piper-tts"),
    "ort_version": onnxruntime.__version__,
    "load_s": load_s,
    "audio_s": audio,
    "render_s": times,
    "first_ms": firsts,
    "paragraph_ms": paras,
    "first_clause_ms": clause_firsts,
}))
"#;
