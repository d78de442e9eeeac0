//! The official `openai` Python client drives the server: lists models, completes and streams
//! chats, scores a prompt, and gets the documented errors (tests/openai_client.py).
//!
//! The client lives in the virtual environment `bash tests/setup` creates (`.venv/`);
//! `MEZO_TEST_PYTHON` points at another interpreter that has `openai` installed.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{workspace_root, Server, ServerOptions};

fn python() -> PathBuf {
    let python = std::env::var_os("MEZO_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run `bash tests/setup` (it creates .venv with the openai client)",
        python.display()
    );
    python
}

#[test]
fn the_official_openai_client_just_works() {
    let server = Server::start(ServerOptions {
        config: "[server]\napi_keys = [\"sk-test\"]\n".into(),
        adapters: vec![("sentiment", Some(1), 7)],
        ..ServerOptions::default()
    });
    let output = Command::new(python())
        .arg(workspace_root().join("tests/openai_client.py"))
        .arg(&server.base)
        .arg("sk-test")
        .output()
        .expect("run the openai client script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "openai client failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        server.log()
    );
    assert!(stdout.contains(" ok"), "{stdout}");
}
