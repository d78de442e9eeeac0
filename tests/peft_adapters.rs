//! Adapters in PEFT's layout, over HTTP: an adapter written by the `peft` package itself (on all
//! seven projections, q and k included) serves the log-probs that HF transformers + PEFT compute
//! with it, in both weight modes; and a version folder published by an earlier release of this
//! server (q/k rows in the engine's order, no row order recorded) is converted once at start-up
//! and serves exactly what it served before.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{post_json, Server, ServerOptions, BASE_MODEL};
use mezo_server::training::{Db, VersionInfo, DB_FILE};
use serde_json::{json, Value};

/// `tests/fixtures/peft_smollm2_lora/`: `peft` 0.21.2's `save_pretrained` of an r=8, α=16
/// adapter on every projection of SmolLM2-135M-Instruct, and `expected.json` with HF
/// transformers' f32 log-probs with and without it.
fn fixture_dir() -> std::path::PathBuf {
    common::workspace_root().join("tests/fixtures/peft_smollm2_lora")
}

fn expected_cases() -> Vec<Value> {
    let path = fixture_dir().join("expected.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let expected: Value = serde_json::from_str(&text).expect("expected.json is JSON");
    expected["cases"].as_array().expect("cases").clone()
}

fn copy_peft_folder(to: &Path) {
    std::fs::create_dir_all(to).expect("create the adapter folder");
    for file in [adapters::peft::CONFIG_FILE, adapters::peft::WEIGHTS_FILE] {
        std::fs::copy(fixture_dir().join(file), to.join(file)).expect("copy the fixture");
    }
}

/// The log-probs of `ids[1..]` given their prefixes, echoed by `/v1/completions` under `model`.
async fn echoed_logprobs(server: &Server, model: &str, ids: &Value) -> Vec<f64> {
    let (status, _, body) = post_json(
        &server.url("/v1/completions"),
        &json!({"model": model, "prompt": ids, "max_tokens": 0, "echo": true, "logprobs": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let lps = body["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .expect("token_logprobs");
    assert!(lps[0].is_null(), "the first token has no context");
    lps[1..]
        .iter()
        .map(|v| v.as_f64().expect("a log-prob"))
        .collect()
}

fn max_difference(got: &[f64], want: &Value) -> f64 {
    let want: Vec<f64> = want
        .as_array()
        .expect("a list of log-probs")
        .iter()
        .map(|v| v.as_f64().expect("a log-prob"))
        .collect();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max)
}

async fn check_peft_fixture(weights: &str) {
    let data = tempfile::tempdir().expect("a temporary folder");
    copy_peft_folder(&data.path().join("adapters/peft-lora"));
    let server = Server::start(ServerOptions {
        config: format!("[model]\nweights = \"{weights}\"\n"),
        data_dir: Some(data.path().to_path_buf()),
        ..ServerOptions::default()
    });
    for case in expected_cases() {
        let text = case["text"].as_str().expect("text");
        let adapted = echoed_logprobs(&server, "peft-lora", &case["ids"]).await;
        let base = echoed_logprobs(&server, BASE_MODEL, &case["ids"]).await;
        let adapted_error = max_difference(&adapted, &case["next_token_logprobs"]);
        let base_error = max_difference(&base, &case["base_next_token_logprobs"]);
        assert!(
            adapted_error <= 2e-3,
            "{weights}: with the adapter, {text:?} is {adapted_error} off PEFT's log-probs"
        );
        assert!(
            base_error <= 2e-3,
            "{weights}: the base model is {base_error} off on {text:?}"
        );
        // The adapter moves these log-probs far more than the tolerance, so a wrong layout
        // cannot pass.
        assert!(max_difference(&adapted, &case["base_next_token_logprobs"]) > 0.1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adapter_saved_by_peft_serves_peft_log_probs_in_quantized_mode() {
    check_peft_fixture("quantized").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adapter_saved_by_peft_serves_peft_log_probs_in_f32_mode() {
    check_peft_fixture("f32").await;
}

/// Writes `adapter` as an earlier release of this server published it: PEFT's keys, but q/k
/// `lora_B` in the engine's row order and only `format` in the metadata.
fn write_engine_order_folder(adapter: &adapters::LoraAdapter, dir: &Path) {
    adapters::peft::save(adapter, dir, BASE_MODEL).expect("save");
    let mut data = BTreeMap::new();
    for (&(layer, module), lora) in &adapter.layers {
        let key = |matrix: &str| {
            format!(
                "base_model.model.{}.{matrix}.weight",
                module.module_path(layer)
            )
        };
        let bytes =
            |values: &[f32]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
        data.insert(
            key("lora_A"),
            (vec![lora.rank, lora.in_dim], bytes(&lora.a)),
        );
        data.insert(
            key("lora_B"),
            (vec![lora.out_dim, lora.rank], bytes(&lora.b)),
        );
    }
    let views = data.iter().map(|(key, (shape, bytes))| {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .expect("a tensor view");
        (key.clone(), view)
    });
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata)).expect("serialize");
    std::fs::write(dir.join(adapters::peft::WEIGHTS_FILE), bytes).expect("write");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_published_by_an_earlier_release_is_converted_and_serves_as_before() {
    let data = tempfile::tempdir().expect("a temporary folder");
    let root = data.path().join("adapters");
    let adapter = common::random_adapter(21);
    let legacy_dir = adapters::store::version_dir(&root, "legacy", 1);
    write_engine_order_folder(&adapter, &legacy_dir);
    // The same adapter as this release writes it, for comparison.
    adapters::peft::save(&adapter, &root.join("current"), BASE_MODEL).expect("save");
    // A plain folder that is no published version is PEFT's own and is left as it is.
    let by_hand = root.join("by-hand");
    write_engine_order_folder(&adapter, &by_hand);
    let by_hand_bytes = std::fs::read(by_hand.join(adapters::peft::WEIGHTS_FILE)).expect("read");
    // The database records `legacy` v1 as published, as the earlier release did.
    Db::open_sqlite(&data.path().join(DB_FILE))
        .expect("open the database")
        .insert_version(
            "legacy",
            &VersionInfo {
                version: 1,
                created_at: 0,
                job_id: None,
                step: None,
                held_out: None,
            },
        )
        .expect("record the version");
    assert_eq!(
        adapters::peft::stored_row_order(&legacy_dir).expect("read"),
        None
    );

    let server = Server::start(ServerOptions {
        data_dir: Some(data.path().to_path_buf()),
        ..ServerOptions::default()
    });
    assert!(
        server.log_shows_within("converted an adapter version", Duration::from_secs(10)),
        "{}",
        server.log()
    );
    let ids = json!([21465, 42, 260, 5049, 314, 253, 2394, 284, 260, 8947, 314, 6672, 30]);
    let legacy = echoed_logprobs(&server, "legacy", &ids).await;
    let current = echoed_logprobs(&server, "current", &ids).await;
    assert_eq!(
        legacy, current,
        "the converted version serves what it served before"
    );
    let base = echoed_logprobs(&server, BASE_MODEL, &ids).await;
    assert_ne!(legacy, base);

    assert_eq!(
        std::fs::read(legacy_dir.join(adapters::peft::WEIGHTS_FILE)).expect("read"),
        std::fs::read(root.join("current").join(adapters::peft::WEIGHTS_FILE)).expect("read"),
        "the converted folder holds what this release writes"
    );
    assert_eq!(
        std::fs::read(by_hand.join(adapters::peft::WEIGHTS_FILE)).expect("read"),
        by_hand_bytes,
        "a folder that is no published version is not rewritten"
    );
    drop(server);

    // A second start finds nothing left to convert.
    let server = Server::start(ServerOptions {
        data_dir: Some(data.path().to_path_buf()),
        ..ServerOptions::default()
    });
    assert!(!server.log().contains("converted an adapter version"));
    assert_eq!(echoed_logprobs(&server, "legacy", &ids).await, current);
}

/// vLLM's runtime endpoints, as RL frameworks call them: a folder written by `peft` under the
/// configured root is loaded as a new adapter and serves PEFT's numbers at once; loading it again
/// needs `load_inplace` and makes a new version; paths outside the root are refused; unloading
/// stops serving it (and leaves the folder it came from alone).
#[tokio::test(flavor = "multi_thread")]
async fn an_adapter_loaded_at_runtime_serves_peft_log_probs_and_unloads() {
    let root = tempfile::tempdir().expect("a temporary folder");
    let folder = root.path().join("round-1");
    copy_peft_folder(&folder);
    let server = Server::start(ServerOptions {
        config: format!(
            "[server]\nlora_load_root = {:?}\n",
            root.path().display().to_string()
        ),
        ..ServerOptions::default()
    });
    let load = |name: &str, path: &Path, in_place: bool| json!({"lora_name": name, "lora_path": path.display().to_string(), "load_inplace": in_place});
    let url = server.url("/v1/load_lora_adapter");

    let (status, _, adapter) = post_json(&url, &load("policy", &folder, false)).await;
    assert_eq!(status, 200, "{adapter}");
    assert_eq!(adapter["live_version"], 1, "{adapter}");
    let (_, models) = common::get_json(&server.url("/v1/models")).await;
    assert!(
        models["data"]
            .as_array()
            .expect("models")
            .iter()
            .any(|m| m["id"] == "policy"),
        "{models}"
    );
    for case in expected_cases() {
        let adapted = echoed_logprobs(&server, "policy", &case["ids"]).await;
        let error = max_difference(&adapted, &case["next_token_logprobs"]);
        assert!(error <= 2e-3, "{error} off PEFT's log-probs");
    }

    // The same name again: only in place, as its next version.
    let (status, _, err) = post_json(&url, &load("policy", &folder, false)).await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("load_inplace"));
    let (status, _, adapter) = post_json(&url, &load("policy", &folder, true)).await;
    assert_eq!(status, 200, "{adapter}");
    assert_eq!(adapter["live_version"], 2, "{adapter}");

    // Outside the root, a file, or nothing there.
    let elsewhere = tempfile::tempdir().expect("a temporary folder");
    copy_peft_folder(&elsewhere.path().join("stray"));
    for (path, status) in [
        (elsewhere.path().join("stray"), 403),
        (folder.join("../.."), 403),
        (root.path().join("missing"), 400),
        (folder.join("adapter_config.json"), 400),
    ] {
        let (got, _, err) = post_json(&url, &load("other", &path, false)).await;
        assert_eq!(got, status, "{}: {err}", path.display());
        assert_eq!(err["error"]["param"], "lora_path", "{err}");
    }
    // A folder under the root that is not a PEFT adapter.
    std::fs::create_dir(root.path().join("empty")).expect("mkdir");
    let (status, _, err) = post_json(&url, &load("other", &root.path().join("empty"), false)).await;
    assert_eq!(status, 400, "{err}");

    let unload = server.url("/v1/unload_lora_adapter");
    let (status, _, body) = post_json(&unload, &json!({"lora_name": "policy"})).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = post_json(
        &server.url("/v1/completions"),
        &json!({"model": "policy", "prompt": "Hi", "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _, _) = post_json(&unload, &json!({"lora_name": "policy"})).await;
    assert_eq!(status, 404);
    assert!(
        folder.join("adapter_model.safetensors").exists(),
        "the source folder stays"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn loading_adapters_at_runtime_is_off_without_a_root() {
    let server = Server::start(ServerOptions::default());
    let (status, _, err) = post_json(
        &server.url("/v1/load_lora_adapter"),
        &json!({"lora_name": "policy", "lora_path": "/tmp"}),
    )
    .await;
    assert_eq!(status, 403, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("lora_load_root"),
        "{err}"
    );
}
