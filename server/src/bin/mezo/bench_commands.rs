//! `mezo bench …` and `mezo fetch-data`: the benchmarks' options and the code that runs each one
//! (the benchmarks themselves are `mezo_server::bench`). Built with the `bench` feature, which
//! brings the HTTP client and the PNG writer that serving does not need.
//!
//! Defaults of the training options are read from the trainer's own defaults, so `bench mezo`
//! runs what `POST /v1/finetune` runs without `hyperparameters`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use mezo_server::bench;
use mezo_server::config::Config;
use mezo_server::datasets::sentiment::{self, SentimentTask};
use mezo_server::engine::weights::WeightMode;
use mezo_server::serve::{bind, serve_on};
use plugin::{Estimator, LrSchedule, Optimizer, TrainedTensors, TrainerConfig};

use crate::{async_runtime, model_path};

/// `mezo fetch-data`.
pub fn fetch_data(config: &Config) -> anyhow::Result<()> {
    for task in [SentimentTask::MovieReviews, SentimentTask::NytEditorials] {
        sentiment::fetch(task, &config.data.dir, &mut std::io::stderr())?;
    }
    Ok(())
}

/// `mezo bench <which>`.
pub fn run(config: Config, which: BenchCommand) -> anyhow::Result<()> {
    let data_dir = config.data.dir.clone();
    match which {
        BenchCommand::Engine { mode, json, peer } => {
            run_bench_engine(&config, &data_dir, mode, json, peer.as_deref())
        }
        BenchCommand::Serve(args) => run_bench_serve(config, args),
        BenchCommand::Soak(args) => run_bench_soak(config, args),
        BenchCommand::Feedback(args) => run_bench_feedback(config, args),
        BenchCommand::Mezo(args) => run_bench_mezo(&config, data_dir, args),
    }
}

fn run_bench_mezo(config: &Config, data_dir: PathBuf, args: MezoBenchArgs) -> anyhow::Result<()> {
    bench::mezo::run(&bench::mezo::MezoBenchConfig {
        task: args.task,
        model: model_path(config)?,
        weights: config.model.weights,
        plot: args
            .plot
            .unwrap_or_else(|| bench::mezo::default_plot_path(&data_dir)),
        data_dir,
        train_size: args.train_size,
        test_size: args.test_size,
        trainer: TrainerConfig {
            max_steps: args.steps,
            eval_every: args.eval_every,
            lr: args.lr,
            lr_schedule: if args.lr_final_fraction == 1.0 {
                LrSchedule::Constant
            } else {
                LrSchedule::Linear {
                    final_fraction: args.lr_final_fraction,
                }
            },
            epsilon: args.epsilon,
            batch_size: args.batch_size,
            seed: args.seed,
            optimizer: args.optimizer.unwrap_or(TrainerConfig::default().optimizer),
            trained_tensors: args
                .trained_tensors
                .unwrap_or(TrainerConfig::default().trained_tensors),
            estimator: args.estimator.unwrap_or(TrainerConfig::default().estimator),
            n_perturbations: args.n_perturbations,
            split_batch: args.split_batch,
            ..TrainerConfig::default()
        },
        top_layers: args.top_layers,
        peer: args.peer,
        peer_steps: args.peer_steps,
        frozen_states_bytes: config.training.frozen_states_bytes,
    })
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Prefill, decode, scoring and memory of the engine, per weight mode.
    Engine {
        /// Which weight modes to measure (each in its own process).
        #[arg(long, value_enum, default_value = "both")]
        mode: BenchModes,
        /// Print one mode's results as JSON (used internally to run modes in child processes).
        #[arg(long, hide = true)]
        json: bool,
        /// A Python with llama-cpp-python: run llama.cpp's prefill and decode on the same GGUF
        /// and tokens after ours and print both (see the README's peer benchmarks).
        #[arg(long)]
        peer: Option<PathBuf>,
    },
    /// MeZO on the movie-review sentiment task: accuracy, step time, memory, curves (PNG).
    Mezo(MezoBenchArgs),
    /// Concurrent streaming clients over HTTP: tokens/s, time to first token, latency.
    Serve(ServeBenchArgs),
    /// A long day in minutes: streaming chats, a fine-tuning job and ratings at once; errors,
    /// latency and memory per minute.
    Soak(SoakBenchArgs),
    /// Users who rate the answers: free-text sentiment answers over HTTP, rated up or down, an
    /// adapter training continuously on the ratings; right answers per window of requests.
    Feedback(FeedbackBenchArgs),
}

#[derive(Args)]
pub struct FeedbackBenchArgs {
    /// Movie reviews asked about and rated, one request each.
    #[arg(long, default_value_t = 300)]
    pub items: usize,
    /// A continuous-training job starts each time this many ratings have arrived.
    #[arg(long, default_value_t = 30)]
    pub feedback_every: u32,
    /// Steps of each job (default: the server's for continuous training).
    #[arg(long)]
    pub steps: Option<u64>,
    /// The share of wrong answers whose rating carries a `corrected_answer`; 0: thumbs up/down
    /// only.
    #[arg(long, default_value_t = 0.5)]
    pub correction_rate: f64,
    /// What a correction is: the answer edited (its wrong label word replaced by the right one)
    /// or the right label word alone.
    #[arg(long, value_enum, default_value = "edit")]
    pub corrections: bench::feedback::CorrectionStyle,
    /// Requests per line of the report.
    #[arg(long, default_value_t = 30)]
    pub window: usize,
    /// Reviews nobody rates, answered by the base model first and by the last version at the end.
    #[arg(long, default_value_t = 100)]
    pub probe: usize,
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Seed of which wrong answers get a correction.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep asking while a job trains (answers then come from whichever version is live);
    /// by default each job finishes before the next request.
    #[arg(long)]
    pub no_wait: bool,
    /// The adapter trained (it must not exist yet on a server given with `--url`).
    #[arg(long, default_value = "feedback-bench")]
    pub adapter: String,
    /// Benchmark this running server instead of starting one in this process.
    #[arg(long)]
    pub url: Option<String>,
}

#[derive(Args)]
pub struct SoakBenchArgs {
    #[arg(long, default_value_t = 10)]
    pub minutes: usize,
    /// Concurrent streaming chat clients.
    #[arg(long, default_value_t = 32)]
    pub streams: usize,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// A fine-tuning job runs throughout, and a user rates an answer every few seconds.
    #[arg(long)]
    pub with_training: bool,
    /// Soak this running server instead of starting one in this process.
    #[arg(long)]
    pub url: Option<String>,
}

#[derive(Args)]
pub struct ServeBenchArgs {
    /// Concurrency levels to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub concurrency: Vec<usize>,
    /// Requests each client sends one after another.
    #[arg(long, default_value_t = 4)]
    pub requests: usize,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Benchmark this running server instead of starting one in this process.
    #[arg(long)]
    pub url: Option<String>,
    /// Model id to request (default: the base model).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Measure again while a fine-tuning job runs, and print the latency ratios.
    #[arg(long)]
    pub with_training: bool,
}

#[derive(Args)]
pub struct MezoBenchArgs {
    /// The sentiment task to train on.
    #[arg(long, value_enum, default_value = "movie-reviews")]
    pub task: SentimentTask,
    /// Evaluate on the held-out set every this many steps.
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    #[arg(long, default_value_t = 512)]
    pub train_size: usize,
    #[arg(long, default_value_t = 1000)]
    pub test_size: usize,
    /// Steps of the run. This and the options below default to the trainer's own defaults, the
    /// run `POST /v1/finetune` makes without `hyperparameters` (the README's learning table says
    /// how they were chosen).
    #[arg(long, default_value_t = TrainerConfig::default().max_steps)]
    pub steps: u64,
    /// The learning rate at the first step.
    #[arg(long, default_value_t = TrainerConfig::default().lr)]
    pub lr: f32,
    /// The learning rate decays linearly from `--lr` to this fraction of it at the last step;
    /// 1 keeps it constant.
    #[arg(long, default_value_t = final_fraction(TrainerConfig::default().lr_schedule))]
    pub lr_final_fraction: f32,
    #[arg(long, default_value_t = TrainerConfig::default().epsilon)]
    pub epsilon: f32,
    #[arg(long, default_value_t = TrainerConfig::default().batch_size)]
    pub batch_size: usize,
    #[arg(long, default_value_t = TrainerConfig::default().seed)]
    pub seed: u64,
    /// The optimizer, by name (`sgd`, `momentum`, `adam`, with their default parameters) or as
    /// the API's JSON, e.g. '{"type":"momentum","beta":0.8}'. Default: the trainer's.
    #[arg(long, value_parser = parse_optimizer)]
    pub optimizer: Option<Optimizer>,
    /// Directions per step (n-SPSA's q).
    #[arg(long, default_value_t = TrainerConfig::default().n_perturbations)]
    pub n_perturbations: usize,
    /// Each direction is evaluated on its own `batch-size / n-perturbations` examples (P-RGE).
    #[arg(long, default_value_t = TrainerConfig::default().split_batch, action = clap::ArgAction::Set)]
    pub split_batch: bool,
    /// The adapter tensors trained: `all`, or `lora-b` (A stays as initialised, LoRA-FA).
    /// Default: the trainer's.
    #[arg(long, value_parser = parse_api_name::<TrainedTensors>)]
    pub trained_tensors: Option<TrainedTensors>,
    /// How a step's losses become projected gradients: `central` (MeZO's θ ± εz, two
    /// evaluations per direction) or `fzoo` (θ + εz against L(θ), divided by the spread of the
    /// losses: N + 1 evaluations for N directions). Default: the trainer's.
    #[arg(long, value_parser = parse_api_name::<Estimator>)]
    pub estimator: Option<Estimator>,
    /// Adapt only the top N layers (PEFT's layers_to_transform); the layers below are computed
    /// once per example and reused at every step. Default: every layer.
    #[arg(long)]
    pub top_layers: Option<usize>,
    /// A Python with torch, transformers, peft and gguf: run the MeZO paper's reference step on
    /// the same batches after ours and print both (see the README's peer benchmarks).
    #[arg(long)]
    pub peer: Option<PathBuf>,
    /// Steps of the reference to time.
    #[arg(long, default_value_t = 10)]
    pub peer_steps: usize,
    /// Where to write the PNG of the curves (default: `<data-dir>/mezo_sentiment_curves.png`).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// The `--lr-final-fraction` of a schedule: 1 for a constant learning rate.
pub fn final_fraction(schedule: LrSchedule) -> f32 {
    match schedule {
        LrSchedule::Constant => 1.0,
        LrSchedule::Linear { final_fraction } => final_fraction,
    }
}

/// `--optimizer`: a name, or the JSON the API takes.
pub fn parse_optimizer(text: &str) -> Result<Optimizer, String> {
    let json = if text.trim_start().starts_with('{') {
        text.to_string()
    } else {
        serde_json::json!({ "type": text }).to_string()
    };
    let optimizer: Optimizer = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    optimizer.validate().map_err(|e| e.to_string())?;
    Ok(optimizer)
}

/// An option whose values are the API's names, with `-` for `_` (`lora-b` or `lora_b`).
pub fn parse_api_name<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(text.replace('-', "_")))
        .map_err(|e| e.to_string())
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BenchModes {
    F32,
    Quantized,
    Both,
}

fn run_bench_serve(mut config: Config, args: ServeBenchArgs) -> anyhow::Result<()> {
    if args.concurrency.contains(&0) || args.requests == 0 || args.max_tokens == 0 {
        bail!("--concurrency levels, --requests and --max-tokens must be at least 1");
    }
    let runtime = async_runtime()?;
    // The training job's examples: the movie reviews of `mezo bench mezo`.
    let reviews = if args.with_training {
        let reviews = sentiment::load(
            SentimentTask::MovieReviews,
            &config.data.dir,
            &mut std::io::stderr(),
        )?;
        sentiment::split(reviews, 0, 512, 0).0
    } else {
        Vec::new()
    };
    // The in-process server's jobs, versions and database are the benchmark's own.
    let scratch = tempfile::tempdir().context("cannot create a temporary data folder")?;
    runtime.block_on(async move {
        // Every client's requests must fit the queue, or the benchmark measures 429s.
        let most = args.concurrency.iter().max().copied().unwrap_or(1);
        config.scheduler.max_waiting = config.scheduler.max_waiting.max(most);
        let base_url = bench_server(args.url, config, scratch.path()).await?;
        let model = match args.model_id {
            Some(id) => id,
            None => first_model_id(&base_url).await?,
        };
        let bench_config = bench::serve::ServeBenchConfig {
            base_url: base_url.clone(),
            model: model.clone(),
            concurrency: args.concurrency,
            requests_per_client: args.requests,
            max_tokens: args.max_tokens,
        };
        let header = format!(
            "machine: {}\nserver: {base_url}, model {model}, {} requests per client, max_tokens {}, greedy, streaming",
            bench::engine::machine_description(),
            bench_config.requests_per_client,
            bench_config.max_tokens
        );
        if args.with_training {
            let job = bench::serve::sentiment_job(&reviews);
            let result = bench::serve::run_with_training(&bench_config, &job)
                .await
                .map_err(anyhow::Error::msg)?;
            println!("{header}\n\nidle:");
            print!("{}", bench::serve::render_table(&result.idle));
            println!("\nwith one fine-tuning job running:");
            print!("{}", bench::serve::render_table(&result.training));
            println!();
            print!("{}", bench::serve::render_comparison(&result));
        } else {
            let results = bench::serve::run(&bench_config)
                .await
                .map_err(anyhow::Error::msg)?;
            println!("{header}");
            print!("{}", bench::serve::render_table(&results));
        }
        Ok(())
    })
}

fn run_bench_soak(mut config: Config, args: SoakBenchArgs) -> anyhow::Result<()> {
    if args.minutes == 0 || args.streams == 0 || args.max_tokens == 0 {
        bail!("--minutes, --streams and --max-tokens must be at least 1");
    }
    let runtime = async_runtime()?;
    let job = if args.with_training {
        let reviews = sentiment::load(
            SentimentTask::MovieReviews,
            &config.data.dir,
            &mut std::io::stderr(),
        )?;
        Some(bench::serve::sentiment_job(
            &sentiment::split(reviews, 0, 512, 0).0,
        ))
    } else {
        None
    };
    let scratch = tempfile::tempdir().context("cannot create a temporary data folder")?;
    runtime.block_on(async move {
        // Every stream and the rater must fit the queue, or the soak measures 429s.
        config.scheduler.max_waiting = config.scheduler.max_waiting.max(args.streams + 1);
        let base_url = bench_server(args.url, config, scratch.path()).await?;
        let model = first_model_id(&base_url).await?;
        let soak = bench::soak::SoakConfig {
            serve: bench::serve::ServeBenchConfig {
                base_url: base_url.clone(),
                model: model.clone(),
                concurrency: vec![args.streams],
                requests_per_client: 1,
                max_tokens: args.max_tokens,
            },
            minutes: args.minutes,
            streams: args.streams,
            job,
        };
        let result = bench::soak::run(&soak).await.map_err(anyhow::Error::msg)?;
        println!(
            "machine: {}\nserver: {base_url}, model {model}, {} streaming chats (max_tokens {}, greedy){} for {} minutes",
            bench::engine::machine_description(),
            args.streams,
            args.max_tokens,
            if args.with_training {
                ", one fine-tuning job and a rating every 3 s"
            } else {
                ""
            },
            args.minutes
        );
        print!("{}", bench::soak::render_table(&result));
        println!(
            "errors: {} (chat requests and ratings; ratings sent: {})",
            result.errors(),
            result.ratings
        );
        for error in &result.first_errors {
            println!("  {error}");
        }
        if let Some(growth) = result.memory_growth() {
            println!("resident memory at the end / after the first minute: {growth:.3}");
        }
        Ok(())
    })
}

/// The server a benchmark talks to: the one at `url`, or one started in this process on a free
/// local port with `scratch` as its data folder; its URL once it is ready.
async fn bench_server(
    url: Option<String>,
    mut config: Config,
    scratch: &Path,
) -> anyhow::Result<String> {
    if let Some(url) = url {
        return Ok(url.trim_end_matches('/').to_string());
    }
    config.data.dir = scratch.to_path_buf();
    config.server.host = "127.0.0.1".into();
    config.server.port = 0;
    let model = model_path(&config)?;
    let listener = bind(&config).await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(serve_on(listener, config, model));
    wait_until_ready(&url).await?;
    Ok(url)
}

fn run_bench_feedback(config: Config, args: FeedbackBenchArgs) -> anyhow::Result<()> {
    if args.items == 0 || args.window == 0 || args.feedback_every == 0 || args.max_tokens == 0 {
        bail!("--items, --window, --feedback-every and --max-tokens must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.correction_rate) {
        bail!(
            "--correction-rate must be in [0, 1] (given {})",
            args.correction_rate
        );
    }
    let reviews = sentiment::load(
        SentimentTask::MovieReviews,
        &config.data.dir,
        &mut std::io::stderr(),
    )?;
    if args.items + args.probe > reviews.len() {
        bail!(
            "--items and --probe together must be at most {} (the reviews there are)",
            reviews.len()
        );
    }
    let (rated, probe) = sentiment::split(reviews, 0, args.items, args.probe);
    let runtime = async_runtime()?;
    let scratch = tempfile::tempdir().context("cannot create a temporary data folder")?;
    runtime.block_on(async move {
        let base_url = bench_server(args.url, config, scratch.path()).await?;
        let bench_config = bench::feedback::FeedbackBenchConfig {
            base_model: first_model_id(&base_url).await?,
            base_url,
            adapter: args.adapter,
            rated,
            probe,
            feedback_every: args.feedback_every,
            steps: args.steps,
            correction_rate: args.correction_rate,
            corrections: args.corrections,
            window: args.window,
            max_tokens: args.max_tokens,
            seed: args.seed,
            wait_for_training: !args.no_wait,
        };
        println!(
            "machine: {}\nserver: {}, base model {}; adapter {} trains on every {} ratings ({} steps each); {} rated requests, corrections ({}) on {}% of the wrong answers, max_tokens {}, greedy; {}",
            bench::engine::machine_description(),
            bench_config.base_url,
            bench_config.base_model,
            bench_config.adapter,
            bench_config.feedback_every,
            bench_config
                .steps
                .map_or_else(|| "the server's default".to_string(), |s| s.to_string()),
            bench_config.rated.len(),
            bench_config.corrections.describe(),
            100.0 * bench_config.correction_rate,
            bench_config.max_tokens,
            if bench_config.wait_for_training {
                "each job finishes before the next request"
            } else {
                "requests go on while jobs train"
            }
        );
        println!("question: {:?}", bench::feedback::QUESTION);
        let result = bench::feedback::run(&bench_config)
            .await
            .map_err(anyhow::Error::msg)?;
        print!("{}", bench::feedback::render(&bench_config, &result));
        Ok(())
    })
}

async fn wait_until_ready(base_url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(response) = client.get(format!("{base_url}/ready")).send().await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    bail!("the server at {base_url} did not become ready within a minute")
}

/// The first model `/v1/models` lists: the base model.
async fn first_model_id(base_url: &str) -> anyhow::Result<String> {
    let models: serde_json::Value = reqwest::get(format!("{base_url}/v1/models"))
        .await?
        .json()
        .await?;
    models["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .context("the server lists no models")
}

fn run_bench_engine(
    config: &Config,
    data_dir: &Path,
    modes: BenchModes,
    json: bool,
    peer: Option<&Path>,
) -> anyhow::Result<()> {
    let path = model_path(config)?;
    // Make sure the data is there before child processes race to fetch it.
    sentiment::fetch(
        SentimentTask::MovieReviews,
        data_dir,
        &mut std::io::stderr(),
    )?;
    let modes = match modes {
        BenchModes::F32 => vec![WeightMode::F32],
        BenchModes::Quantized => vec![WeightMode::Quantized],
        BenchModes::Both => vec![WeightMode::F32, WeightMode::Quantized],
    };
    if json {
        let [mode] = modes.as_slice() else {
            bail!("--json measures exactly one mode; pass --mode f32 or --mode quantized");
        };
        let result = bench::engine::run_mode(&path, *mode, data_dir)?;
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }
    let mut results = Vec::new();
    for mode in modes {
        eprintln!("measuring {mode} weights …");
        results.push(bench_engine_child(&path, mode, data_dir)?);
    }
    println!("machine: {}", bench::engine::machine_description());
    println!("model: {}", path.display());
    print!("{}", bench::engine::render_table(&results));
    if let Some(python) = peer {
        let peer = bench::engine::run_llama_cpp(python, &path, data_dir)?;
        print!("{}", bench::engine::render_peer_table(&results, &peer));
    }
    Ok(())
}

/// Runs one mode in a child process so its peak resident memory is its own.
fn bench_engine_child(
    model: &Path,
    mode: WeightMode,
    data_dir: &Path,
) -> anyhow::Result<bench::engine::EngineBenchResult> {
    let exe = std::env::current_exe().context("cannot locate the mezo executable")?;
    let output = Command::new(exe)
        .arg("--model")
        .arg(model)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["bench", "engine", "--json", "--mode", &mode.to_string()])
        .env("RUST_LOG", "warn")
        .output()
        .context("cannot start the benchmark process")?;
    if !output.status.success() {
        bail!(
            "the {mode} benchmark failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8(output.stdout)?;
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("unexpected benchmark output: {line}"))
}
