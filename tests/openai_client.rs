//! The official `openai` Python client drives the server: lists models, completes and streams
//! chats, scores a prompt, gets the documented errors, and fine-tunes through OpenAI's files and
//! jobs (tests/openai_client.py); the fine-tuning demo of `examples/` runs end to end.
//!
//! The client lives in the virtual environment `bash tests/setup` creates (`.venv/`);
//! `MEZO_TEST_PYTHON` points at another interpreter that has `openai` installed.

mod common;

use std::process::Command;

use common::{test_python, workspace_root, Server, ServerOptions};

#[test]
fn the_official_openai_client_just_works() {
    let server = Server::start(ServerOptions {
        config: "[server]\napi_keys = [\"sk-test\"]\n".into(),
        adapters: vec![("sentiment", Some(1), 7)],
        ..ServerOptions::default()
    });
    let output = Command::new(test_python())
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

/// `examples/sentiment_finetune.py`, the fine-tuning demo, end to end on a tiny data file.
#[test]
fn the_sentiment_fine_tuning_demo_runs() {
    let server = Server::start(ServerOptions::default());
    let data = tempfile::NamedTempFile::new().expect("a data file");
    let reviews = [
        ("A warm, funny and moving film.", 3.1),
        ("Dull, slow and far too long.", -2.6),
        ("The best thing I have seen all year.", 3.4),
        ("A tedious mess.", -3.0),
        ("Brilliant acting and a clever script.", 2.9),
        ("I walked out halfway through.", -2.2),
        ("Charming and beautifully shot.", 2.5),
        ("Boring from the first minute.", -2.8),
        ("Just fine.", 0.2),
        ("Gripping and full of heart.", 3.0),
        ("The worst film of the decade.", -3.5),
    ];
    let text: String = reviews
        .iter()
        .enumerate()
        .map(|(i, (review, rating))| format!("{i}\t{rating}\t{review}\r\n"))
        .collect();
    std::fs::write(data.path(), text).expect("write the data file");
    let output = Command::new(test_python())
        .arg(workspace_root().join("examples/sentiment_finetune.py"))
        .args(["--url", &server.base, "--data"])
        .arg(data.path())
        .args(["--train", "4", "--test", "2", "--steps", "2"])
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the demo failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        server.log()
    );
    assert!(stdout.contains("job succeeded after 2 steps"), "{stdout}");
    assert!(stdout.contains("sentiment-demo"), "{stdout}");
}
