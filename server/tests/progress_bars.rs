//! Long work shows progress bars on a terminal and nothing of them in logs: `mezo fetch-model`
//! (checking the file's SHA-256) and `mezo generate` (loading the weights), each run once under
//! a pseudo-terminal (util-linux's `script`) and once with stderr piped, as a log would be.

mod common;

use std::path::Path;
use std::process::{Command, Output};

/// `mezo` with `args`, its stderr a pipe; returns stdout and stderr together.
fn piped(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_mezo"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run mezo");
    text(&output, args)
}

/// `mezo` with `args` on a pseudo-terminal; returns what the terminal showed.
fn on_a_terminal(args: &[&str]) -> String {
    let quoted: Vec<String> = std::iter::once(env!("CARGO_BIN_EXE_mezo"))
        .chain(args.iter().copied())
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    let output = Command::new("script")
        .args(["--quiet", "--return", "--command"])
        .arg(quoted.join(" "))
        .arg("/dev/null")
        .env("NO_COLOR", "1")
        .env("COLUMNS", "120")
        .output()
        .expect("run mezo under `script` (util-linux)");
    text(&output, args)
}

fn text(output: &Output, args: &[&str]) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "mezo {args:?} failed: {text}");
    text
}

fn model_dir() -> String {
    let model = common::model_path();
    model
        .parent()
        .map(Path::to_string_lossy)
        .expect("the model is in a folder")
        .into_owned()
}

#[test]
fn fetch_model_shows_its_checksum_progress_only_on_a_terminal() {
    let dir = model_dir();
    let args = ["fetch-model", "--dir", dir.as_str()];
    let shown = on_a_terminal(&args);
    assert!(shown.contains("model already present"), "{shown}");
    assert!(
        shown.contains("checking SHA-256") || shown.contains("checked SHA-256"),
        "a bar on the terminal: {shown}"
    );
    assert!(shown.contains("MiB"), "bytes counted: {shown}");

    let logged = piped(&args);
    assert!(logged.contains("model already present"), "{logged}");
    assert!(!logged.contains("SHA-256"), "no bar in a log: {logged}");
    assert!(
        !logged.contains('\r') && !logged.contains('\u{1b}'),
        "no terminal control in a log: {logged:?}"
    );
}

#[test]
fn loading_the_weights_shows_progress_only_on_a_terminal() {
    let model = common::model_path();
    let model = model.to_string_lossy();
    let args = ["--model", &model, "generate", "Hello", "--max-tokens", "1"];
    let shown = on_a_terminal(&args);
    assert!(shown.contains("loading the weights"), "{shown}");
    let logged = piped(&args);
    assert!(!logged.contains("loading the weights"), "{logged}");
    assert!(!logged.contains('\r'), "{logged:?}");
}
