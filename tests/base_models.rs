//! A base model (its GGUF carries no `tokenizer.chat_template`) serves text completions; chat
//! requests and chat training examples are refused with a 400 that says how to give it a
//! template, and `--chat-template FILE` (here through `MEZO_CHAT_TEMPLATE`) gives it one.
//! Gemma 3 270M, a base model of another architecture, serves the reference's greedy text and
//! trains an adapter that it then serves.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{get_json, post_json, Server, ServerOptions};
use serde_json::json;

/// The default model written without its chat template: what a base model's file looks like.
fn write_without_template(path: &Path) {
    common::write_model_variant(
        path,
        |metadata| metadata.retain(|(key, _)| key != "tokenizer.chat_template"),
        |_, tensor| Some(tensor),
        Vec::new(),
    );
}

async fn base_model_id(server: &Server) -> String {
    let (status, models) = get_json(&server.url("/v1/models")).await;
    assert_eq!(status, 200, "{models}");
    models["data"][0]["id"]
        .as_str()
        .expect("the base model's id")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_base_model_serves_completions_and_explains_how_to_chat() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("smollm2-base.gguf");
    write_without_template(&model);

    let server = Server::start(ServerOptions {
        model: Some(model.clone()),
        ..ServerOptions::default()
    });
    let id = base_model_id(&server).await;
    let (status, _, completion) = post_json(
        &server.url("/v1/completions"),
        &json!({"model": id, "prompt": "The capital of France is", "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200, "{completion}");
    assert!(!completion["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .is_empty());

    let chat = json!({"model": id, "messages": [{"role": "user", "content": "Hi"}]});
    let (status, _, err) = post_json(&server.url("/v1/chat/completions"), &chat).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "messages", "{err}");
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no chat template") && message.contains("--chat-template FILE"),
        "{err}"
    );

    // Chat training examples need the template too; plain prompt/completion ones do not.
    let job = json!({
        "adapter": "base-chat",
        "objective": "completion",
        "examples": [{"messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}
        ]}],
    });
    let (status, _, err) = post_json(&server.url("/v1/finetune"), &job).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "examples[0].messages", "{err}");
    drop(server);

    // Given a template, the same file chats.
    let template = dir.path().join("chatml.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
         {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .expect("write the template");
    let server = Server::start(ServerOptions {
        model: Some(model),
        env: vec![("MEZO_CHAT_TEMPLATE", template.display().to_string())],
        ..ServerOptions::default()
    });
    let chat = json!({
        "model": base_model_id(&server).await,
        "messages": [{"role": "user", "content": "What is 2+2?"}],
        "max_tokens": 8,
    });
    let (status, _, reply) = post_json(&server.url("/v1/chat/completions"), &chat).await;
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["choices"][0]["message"]["content"].is_string(),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gemma3_serves_the_reference_continuation_and_trains_an_adapter() {
    let server = Server::start(ServerOptions {
        model: Some(common::gemma_model_path()),
        ..ServerOptions::default()
    });
    let id = base_model_id(&server).await;
    let case = &common::gemma_golden()["cases"][0];
    let (status, _, completion) = post_json(
        &server.url("/v1/completions"),
        &json!({"model": id, "prompt": case["text"], "max_tokens": 16, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{completion}");
    assert_eq!(completion["choices"][0]["text"], case["greedy_text"]);

    let examples: Vec<_> = [
        ("a gorgeous, witty film", 1),
        ("a tedious mess", 0),
        ("the best thing this year", 1),
        ("dull and far too long", 0),
    ]
    .iter()
    .map(|(review, label)| {
        json!({
            "prompt": format!("Review: {review}\nSentiment:"),
            "candidates": [" negative", " positive"],
            "label": label,
        })
    })
    .collect();
    let job = json!({
        "adapter": "gemma-sentiment",
        "objective": "classification",
        "examples": examples,
        "hyperparameters": {"max_steps": 2, "batch_size": 4},
    });
    let (status, _, job) = post_json(&server.url("/v1/finetune"), &job).await;
    assert_eq!(status, 202, "{job}");
    let job_url = server.url(&format!("/v1/finetune/{}", job["id"].as_str().expect("id")));
    let deadline = Instant::now() + Duration::from_secs(300);
    let job = loop {
        let (_, job) = get_json(&job_url).await;
        if matches!(
            job["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            break job;
        }
        assert!(Instant::now() < deadline, "{job}\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(job["status"], "succeeded", "{job}\n{}", server.log());

    let (status, _, adapted) = post_json(
        &server.url("/v1/completions"),
        &json!({"model": "gemma-sentiment", "prompt": "Review: great fun.\nSentiment:", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200, "{adapted}");
    assert_eq!(adapted["adapter_version"], 1, "{adapted}");
}
