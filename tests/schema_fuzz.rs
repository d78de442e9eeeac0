//! Inputs nobody thought of: schemathesis (from `bash tests/setup`, in `.venv/`) generates
//! requests for every operation of the server's own `/openapi.json`, 30 per operation with a
//! fixed seed, after tests/schema_fuzz.py has given the server one of each resource. No
//! response may be a 5xx, break the spec (status, content type, headers, body schema), or accept
//! a request the spec rejects; the server must be alive and answering afterwards.
//!
//! Findings become tests of their own, named after what they caught (in `http_api.rs`).

mod common;

use std::process::Command;
use std::time::Instant;

use common::{test_python, workspace_root, Server, ServerOptions};

/// Generation ends at 48 tokens and jobs at 4 steps, so every case is quick.
const FUZZ_CONFIG: &str = "[model]\nmax_model_len = 48\n[training]\nmax_steps = 4\n";

#[test]
fn schemathesis_finds_no_server_error_and_no_answer_outside_the_spec() {
    let mut server = Server::start(ServerOptions {
        config: FUZZ_CONFIG.into(),
        ..ServerOptions::default()
    });
    let report = tempfile::tempdir().expect("a report folder");
    let started = Instant::now();
    let output = Command::new(test_python())
        .arg(workspace_root().join("tests/schema_fuzz.py"))
        .arg(&server.base)
        .arg(report.path())
        .output()
        .expect("run tests/schema_fuzz.py");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary: Vec<&str> = stdout
        .lines()
        .skip_while(|line| !line.contains("SUMMARY"))
        .collect();
    println!(
        "schemathesis took {:.0} s\n{}",
        started.elapsed().as_secs_f64(),
        summary.join("\n")
    );
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{stdout}\n{stderr}\nserver log (tail):\n{}",
        tail(&server.log(), 60)
    );
    assert!(
        stdout.contains("Tested: 35"),
        "every operation of the spec but its own (`GET /openapi.json`) was tested:\n{stdout}"
    );
    assert_eq!(
        server.blocking_status("/health"),
        Some(200),
        "the server is alive after the fuzzing"
    );
    assert_eq!(server.blocking_status("/ready"), Some(200));
    assert!(
        server
            .terminate(std::time::Duration::from_secs(30))
            .is_some(),
        "the server shuts down cleanly after the fuzzing"
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
