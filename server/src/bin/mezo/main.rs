//! `mezo`: the command line of mezo-serve. Parses arguments ([`cli`]), builds the configuration,
//! and hands off to the library: serving, fetching the model and generating are here, the
//! benchmarks in [`bench_commands`] (built with the `bench` feature, on by default).

#[cfg(feature = "bench")]
mod bench_commands;
mod cli;

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use cli::{Cli, Commands, GenerateArgs, GlobalArgs, ServeArgs};
use mezo_server::config::Config;
use mezo_server::engine::chat_template::ChatMessage;
use mezo_server::engine::generate::{generate, GenerationParams, Sequence, StopConditions};
use mezo_server::engine::loaded_model::LoadedModel;
use mezo_server::engine::lora::AdapterView;
use mezo_server::engine::sampler::SamplingParams;
use mezo_server::fetch::{fetch_model, known_model, known_model_names};
use mezo_server::serve::serve;
use mezo_server::training::{self, DatabaseUrl, Db};

fn main() {
    pin_thread_count();
    let cli = Cli::parse();
    init_tracing();
    if let Err(err) = run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// candle asks for its thread count on every tensor operation and, unless `RAYON_NUM_THREADS`
/// is set, answers by parsing `/proc/cpuinfo` (measured: ~4% of decode time). Setting the
/// variable once, before any thread starts, makes that a cheap environment lookup.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = build_config(&cli.global)?;
    match cli.command {
        Commands::Serve(args) => run_serve(config, args),
        Commands::FetchModel { name, dir } => {
            let source = known_model(&name).with_context(|| {
                format!(
                    "`{name}` is not a model this command knows; it fetches {} (any other GGUF \
                     file can be given to `--model` as a path)",
                    known_model_names()
                )
            })?;
            let dir = dir.unwrap_or(config.model.dir.clone());
            fetch_model(source, &dir, &mut std::io::stderr())?;
            Ok(())
        }
        Commands::CopyDatabase { to } => copy_database(&config, &to),
        Commands::Generate(args) => run_generate(&config, args),
        #[cfg(feature = "bench")]
        Commands::FetchData => bench_commands::fetch_data(&config),
        #[cfg(feature = "bench")]
        Commands::Bench { which } => bench_commands::run(config, which),
    }
}

/// Copies the configured database into the empty database `to`, saying what it copied.
fn copy_database(config: &Config, to: &str) -> anyhow::Result<()> {
    let from = training::database_url(&config.data)?;
    let to = DatabaseUrl::parse(to)?;
    if from == to {
        anyhow::bail!("`--to` is the database being copied ({from}); name another one");
    }
    if let DatabaseUrl::Sqlite(path) = &from {
        anyhow::ensure!(
            path.exists(),
            "there is no database at {} to copy; check --data-dir or --database",
            path.display()
        );
    }
    let source = Db::open(&from)?;
    let target = Db::open(&to)?;
    eprintln!("copying {from} into {to}");
    let started = std::time::Instant::now();
    for (table, rows) in source.copy_into(&target)? {
        eprintln!("  {table}: {rows} rows");
    }
    eprintln!(
        "done in {:.1} s; start the server with --database {to} (adapter folders stay in {})",
        started.elapsed().as_secs_f64(),
        config.data.adapters_dir().display()
    );
    Ok(())
}

/// Defaults, then the config file, then flags and `MEZO_*` variables.
fn build_config(global: &GlobalArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(global.config.as_deref())?;
    if let Some(model) = &global.model {
        config.model.path = model.clone();
    }
    if let Some(weights) = global.weights {
        config.model.weights = weights;
    }
    if let Some(template) = &global.chat_template {
        config.model.chat_template = template.clone();
    }
    if let Some(dir) = &global.data_dir {
        config.data.dir = dir.clone();
    }
    if let Some(database) = &global.database {
        config.data.database = database.clone();
    }
    Ok(config)
}

/// The model file to load; a known model (the default, or one named by `--model`) is fetched
/// when missing.
fn model_path(config: &Config) -> anyhow::Result<PathBuf> {
    let (path, known) = config.model.resolved_path();
    if let Some(source) = known.filter(|_| !path.exists()) {
        eprintln!("the model {} is not here yet; fetching it", source.name);
        fetch_model(source, &config.model.dir, &mut std::io::stderr())?;
    }
    Ok(path)
}

fn run_serve(mut config: Config, args: ServeArgs) -> anyhow::Result<()> {
    if let Some(host) = args.host {
        config.server.host = host;
    }
    if let Some(port) = args.port {
        config.server.port = port;
    }
    config.server.api_keys.extend(
        args.api_keys
            .into_iter()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty()),
    );
    config.validate().map_err(anyhow::Error::msg)?;
    let model = model_path(&config)?;
    let runtime = async_runtime()?;
    runtime.block_on(serve(config, model))?;
    Ok(())
}

fn async_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run_generate(config: &Config, args: GenerateArgs) -> anyhow::Result<()> {
    let model = LoadedModel::load_with_template(
        &model_path(config)?,
        config.model.weights,
        config.model.chat_template_file(),
    )?;
    let text = if args.chat {
        let messages = [ChatMessage {
            role: "user".into(),
            content: args.prompt.clone(),
        }];
        model.chat_template()?.render(&messages, true)?
    } else {
        args.prompt.clone()
    };
    let prompt = model.tokenizer.encode_prompt(&text);
    let adapter = match &args.adapter {
        Some(dir) => {
            let lora = adapters::peft::load(dir, &model.transformer.config.dims())
                .with_context(|| format!("loading adapter {}", dir.display()))?;
            Some(AdapterView::new(&lora, &model.transformer.config.dims())?)
        }
        None => None,
    };
    let params = GenerationParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop: StopConditions {
            token_ids: model.tokenizer.eog_ids(),
            ignore_eos: false,
            strings: Vec::new(),
        },
        top_logprobs: None,
    };
    let mut seqs = [Sequence::new(&model.transformer, prompt, adapter, params)?];
    let mut stdout = std::io::stdout().lock();
    generate(
        &model.transformer,
        &model.tokenizer,
        &mut seqs,
        |_, event| {
            let _ = write!(stdout, "{}", event.text);
            let _ = stdout.flush();
        },
    )?;
    writeln!(stdout)?;
    Ok(())
}
