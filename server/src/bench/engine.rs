//! `mezo bench engine`: prefill and decode throughput, the sentiment scoring batch, and peak
//! resident memory, for one weight mode per process (so each mode's peak RSS is its own).

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::datasets::sentiment::{self, SentimentTask, Snippet, CANDIDATES};
use crate::engine::batch::{BatchRow, RowCache};
use crate::engine::generate::{step, GenerationParams, Sequence, StopConditions};
use crate::engine::kernels::isa::Isa;
use crate::engine::kv_cache::KvCache;
use crate::engine::loaded_model::LoadedModel;
use crate::engine::sampler::SamplingParams;
use crate::engine::scoring::{score_continuations, ScoreItem};
use crate::engine::weights::WeightMode;
use crate::engine::Result;
use crate::process_memory;

use super::peers;

/// Prompt length of the prefill measurement.
pub const PREFILL_TOKENS: usize = 200;
/// Examples in the scoring batch: a MeZO step's 16 examples, each with 2 candidates.
pub const SCORING_EXAMPLES: usize = 16;

/// One mode's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineBenchResult {
    pub mode: WeightMode,
    pub load_seconds: f64,
    pub weights_bytes: u64,
    pub prefill_tokens_per_s: f64,
    pub decode_b1_tokens_per_s: f64,
    pub decode_b8_tokens_per_s: f64,
    pub score_16x2_seconds: f64,
    pub peak_rss_bytes: u64,
    /// The matrix kernels' variant (`avx512`, `avx2`, `portable`).
    pub kernels: String,
    /// GFLOP/s of one batched product the size of a training forward's FFN projection.
    pub batched_product_gflops: f64,
    /// The machine's FMA peak with the same registers, measured.
    pub fma_peak_gflops: f64,
}

/// Rows of the batched-product measurement: about a training batch's tokens.
const BATCHED_ROWS: usize = 512;

/// GFLOP/s of `BATCHED_ROWS` rows times a 1536×576 matrix (the FFN's gate projection of the
/// default model) in `mode`: Q4_1 as the default model stores it, or f32. Best of 5.
fn batched_product_gflops(mode: WeightMode) -> Result<f64> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use crate::engine::kernels::PackedMatrix;

    let (out, inp) = (1536, 576);
    let w = Tensor::randn(0f32, 1f32, (out, inp), &Device::Cpu)?;
    let matrix = match mode {
        WeightMode::Quantized => {
            PackedMatrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_1)?)?
                .ok_or_else(|| candle_core::Error::Msg("Q4_1 has kernels".into()))?
        }
        WeightMode::F32 => PackedMatrix::from_f32(&w.flatten_all()?.to_vec1()?, out, inp),
    };
    let xs: Vec<f32> = Tensor::randn(0f32, 1f32, (BATCHED_ROWS * inp,), &Device::Cpu)?.to_vec1()?;
    let mut ys = vec![0f32; BATCHED_ROWS * out];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        matrix.matmul_t(&xs, BATCHED_ROWS, &mut ys);
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (BATCHED_ROWS * out * inp) as f64 / best / 1e9)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// A `PREFILL_TOKENS`-token prompt made of real text.
fn prefill_prompt(model: &LoadedModel, reviews: &[Snippet]) -> Vec<u32> {
    let mut tokens = Vec::new();
    for review in reviews.iter().cycle() {
        tokens.extend(model.tokenizer.encode(&review.prompt(), false));
        if tokens.len() >= PREFILL_TOKENS {
            break;
        }
    }
    tokens.truncate(PREFILL_TOKENS);
    tokens
}

fn prefill_tokens_per_s(model: &LoadedModel, prompt: &[u32], reps: usize) -> Result<f64> {
    let c = &model.transformer.config;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let mut cache = KvCache::new(c.n_layer, c.n_kv_head, c.head_dim);
        let start = Instant::now();
        let mut rows = [BatchRow::last_logits(
            prompt,
            RowCache::Append(&mut cache),
            None,
        )];
        model.transformer.forward(&mut rows)?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(prompt.len() as f64 / median(times))
}

/// Aggregate decode tokens/s of `batch` greedy sequences decoding `steps` tokens each (the
/// prefill step is not timed): `batch` over the median step's time, so that a moment when
/// another process took a core does not move the figure (the peer is timed the same way).
fn decode_tokens_per_s(
    model: &LoadedModel,
    prompt: &[u32],
    batch: usize,
    steps: usize,
) -> Result<f64> {
    let params = GenerationParams {
        max_tokens: steps + 1,
        sampling: SamplingParams::greedy(),
        stop: StopConditions::default(),
        top_logprobs: None,
    };
    let mut seqs: Vec<Sequence> = (0..batch)
        .map(|_| Sequence::new(&model.transformer, prompt.to_vec(), None, params.clone()))
        .collect::<Result<_>>()?;
    let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
    step(&model.transformer, &model.tokenizer, &mut refs)?;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let start = Instant::now();
        step(&model.transformer, &model.tokenizer, &mut refs)?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(batch as f64 / median(times))
}

fn scoring_seconds(model: &LoadedModel, reviews: &[Snippet], reps: usize) -> Result<f64> {
    let prompts: Vec<Vec<u32>> = reviews
        .iter()
        .map(|r| model.tokenizer.encode(&r.prompt(), false))
        .collect();
    let candidates: Vec<Vec<u32>> = CANDIDATES
        .iter()
        .map(|c| model.tokenizer.encode(c, false))
        .collect();
    let items: Vec<ScoreItem<'_>> = prompts
        .iter()
        .map(|p| ScoreItem {
            prompt: p,
            continuations: &candidates,
            adapter: None,
        })
        .collect();
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        score_continuations(&model.transformer, &items)?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// Steps of the batch-1 decode measurement, after a 32-token prompt.
const DECODE_STEPS: usize = 64;
const DECODE_PROMPT_TOKENS: usize = 32;
/// Timed repetitions of the prefill measurement (after one untimed).
const PREFILL_REPS: usize = 5;

/// The 1000 held-out movie reviews of `bench mezo`'s split: the prompts every measurement uses.
fn held_out_reviews(data_dir: &Path) -> anyhow::Result<Vec<Snippet>> {
    let reviews = sentiment::load(
        SentimentTask::MovieReviews,
        data_dir,
        &mut std::io::stderr(),
    )?;
    Ok(sentiment::split(reviews, 0, 512, 1000).1)
}

/// Runs llama.cpp's prefill and decode on the same GGUF and the same prompts' tokens.
pub fn run_llama_cpp(
    python: &Path,
    model_path: &Path,
    data_dir: &Path,
) -> anyhow::Result<peers::LlamaCpp> {
    let test = held_out_reviews(data_dir)?;
    let model = LoadedModel::load(model_path, WeightMode::Quantized)?;
    let prompt = prefill_prompt(&model, &test);
    let input = serde_json::json!({
        "model": model_path,
        "threads": peers::threads(),
        "prefill_prompt": prompt,
        "prefill_reps": PREFILL_REPS,
        "decode_prompt": prompt[..DECODE_PROMPT_TOKENS],
        "decode_steps": DECODE_STEPS,
    });
    drop(model);
    peers::run(python, &peers::LLAMA_CPP, &input)
}

/// Each mode's prefill and decode against llama.cpp's, as speed-ups (above 1: we are faster).
pub fn render_peer_table(results: &[EngineBenchResult], peer: &peers::LlamaCpp) -> String {
    let mut out = format!(
        "peer: llama.cpp through llama-cpp-python ({}), {} threads, same GGUF and tokens\n\
         | weights | prefill tok/s: ours / llama.cpp | decode tok/s, batch 1: ours / llama.cpp | \
         peak RSS (MB): ours / llama.cpp |\n|---|---|---|---|\n",
        peer.versions, peer.threads
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {:.0} / {:.0} = {:.2}× | {:.1} / {:.1} = {:.2}× | {:.0} / {:.0} |\n",
            r.mode,
            r.prefill_tokens_per_s,
            peer.prefill_tokens_per_s,
            r.prefill_tokens_per_s / peer.prefill_tokens_per_s,
            r.decode_b1_tokens_per_s,
            peer.decode_tokens_per_s,
            r.decode_b1_tokens_per_s / peer.decode_tokens_per_s,
            r.peak_rss_bytes as f64 / 1e6,
            peer.peak_rss_bytes as f64 / 1e6,
        ));
    }
    out
}

/// Runs every measurement for one weight mode in this process.
pub fn run_mode(
    model_path: &Path,
    mode: WeightMode,
    data_dir: &Path,
) -> anyhow::Result<EngineBenchResult> {
    let test = held_out_reviews(data_dir)?;
    let batch = &test[..SCORING_EXAMPLES];
    let model = LoadedModel::load(model_path, mode)?;
    let prompt = prefill_prompt(&model, &test);
    let short_prompt = &prompt[..DECODE_PROMPT_TOKENS];
    // One untimed pass warms caches and the allocator.
    prefill_tokens_per_s(&model, &prompt, 1)?;
    Ok(EngineBenchResult {
        mode,
        load_seconds: model.load_time.as_secs_f64(),
        weights_bytes: model.transformer.weights_size_bytes() as u64,
        prefill_tokens_per_s: prefill_tokens_per_s(&model, &prompt, PREFILL_REPS)?,
        decode_b1_tokens_per_s: decode_tokens_per_s(&model, short_prompt, 1, DECODE_STEPS)?,
        decode_b8_tokens_per_s: decode_tokens_per_s(&model, short_prompt, 8, 32)?,
        score_16x2_seconds: scoring_seconds(&model, batch, 5)?,
        peak_rss_bytes: process_memory::peak_resident_bytes().unwrap_or(0),
        kernels: Isa::selected().name().to_string(),
        batched_product_gflops: batched_product_gflops(mode)?,
        fma_peak_gflops: Isa::selected().fma_peak_gflops(),
    })
}

/// One line describing the machine: CPU model, cores, vector extensions, memory.
pub fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let flags = field("flags");
    let simd: Vec<&str> = ["avx2", "fma", "avx512f", "avx512_vnni"]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB"))
                .and_then(|kib| kib.trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / (1 << 20) as f64);
    format!(
        "{} | {} cores | {} | {:.0} GiB",
        field("model name"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        simd.join(" "),
        mem_gib
    )
}

/// The results as a Markdown table (the README quotes it).
pub fn render_table(results: &[EngineBenchResult]) -> String {
    let mut out = String::from(
        "| weights | kernels | prefill tok/s (200-token prompt) | decode tok/s, batch 1 | decode tok/s, batch 8 | score 16×2 (s) | batched product GFLOP/s (512×576 · 576×1536) / FMA peak | peak RSS (MB) | weights (MB) | load (s) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.3} | {:.0} / {:.0} | {:.0} | {:.0} | {:.2} |\n",
            r.mode,
            r.kernels,
            r.prefill_tokens_per_s,
            r.decode_b1_tokens_per_s,
            r.decode_b8_tokens_per_s,
            r.score_16x2_seconds,
            r.batched_product_gflops,
            r.fma_peak_gflops,
            r.peak_rss_bytes as f64 / 1e6,
            r.weights_bytes as f64 / 1e6,
            r.load_seconds,
        ));
    }
    out
}
