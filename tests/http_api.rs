//! The OpenAI-compatible API over real HTTP: a real `mezo serve` on a free port with the real
//! model and two adapters. Shapes, adapters per request, streaming, prompt scoring, and every
//! kind of bad input with its status and error type.

mod common;

use common::{get_json, post_json, post_stream, Server, ServerOptions, BASE_MODEL};
use serde_json::{json, Value};

fn server_with_adapters() -> Server {
    Server::start(ServerOptions {
        adapters: vec![
            ("alpha", Some(1), 1),
            ("alpha", Some(2), 2),
            ("beta", None, 3),
        ],
        ..ServerOptions::default()
    })
}

fn chat(model: &str, content: &str, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0
    })
}

/// Asserts OpenAI's error envelope with this status, type and (when given) param and code.
fn assert_error(
    (status, _, body): &(u16, reqwest::header::HeaderMap, Value),
    want_status: u16,
    want_type: &str,
    want_param: Option<&str>,
    want_code: Option<&str>,
) {
    assert_eq!(*status, want_status, "{body}");
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(error["type"], want_type, "{body}");
    if let Some(param) = want_param {
        assert_eq!(error["param"], param, "{body}");
    }
    if let Some(code) = want_code {
        assert_eq!(error["code"], code, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn models_lists_the_base_model_and_every_adapter() {
    let server = server_with_adapters();
    let (status, list) = get_json(&server.url("/v1/models")).await;
    assert_eq!(status, 200);
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![BASE_MODEL, "alpha", "beta"]);
    for model in list["data"].as_array().unwrap() {
        assert_eq!(model["object"], "model");
        assert!(model["created"].as_u64().unwrap() > 1_600_000_000);
        assert_eq!(model["owned_by"], "mezo-serve");
    }
    let (status, alpha) = get_json(&server.url("/v1/models/alpha")).await;
    assert_eq!(status, 200);
    assert_eq!(alpha["parent"], BASE_MODEL);
    assert_eq!(alpha["live_version"], 2);
    assert_eq!(alpha["versions"], json!([1, 2]));
    let (status, _) = get_json(&server.url("/v1/models/alpha@1")).await;
    assert_eq!(status, 200);
    let (status, missing) = get_json(&server.url("/v1/models/alpha@7")).await;
    assert_eq!(status, 404, "{missing}");
    let (status, missing) = get_json(&server.url("/v1/models/nope")).await;
    assert_eq!(status, 404);
    assert_eq!(missing["error"]["code"], "model_not_found");
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_completions_answer_in_openai_shape_under_the_requested_adapter() {
    let server = server_with_adapters();
    let url = server.url("/v1/chat/completions");
    let (status, headers, base) = post_json(&url, &chat(BASE_MODEL, "Name a color.", 12)).await;
    assert_eq!(status, 200, "{base}");
    assert!(headers.contains_key("x-request-id"));
    assert!(base["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(base["object"], "chat.completion");
    assert_eq!(base["model"], BASE_MODEL);
    let choice = &base["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(matches!(
        choice["finish_reason"].as_str(),
        Some("stop" | "length")
    ));
    let usage = &base["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert!(base.get("adapter_version").is_none());

    // Ids are unique: feedback will refer to them.
    let (_, _, again) = post_json(&url, &chat(BASE_MODEL, "Name a color.", 12)).await;
    assert_ne!(again["id"], base["id"]);
    assert_eq!(
        again["choices"][0]["message"]["content"], base["choices"][0]["message"]["content"],
        "greedy decoding is deterministic"
    );

    // The adapter answers (its live version), a pinned version answers as itself.
    let (_, _, alpha) = post_json(&url, &chat("alpha", "Name a color.", 12)).await;
    assert_eq!(alpha["adapter_version"], 2);
    assert!(alpha["system_fingerprint"]
        .as_str()
        .unwrap()
        .contains("alpha@2"));
    let (_, _, alpha1) = post_json(&url, &chat("alpha@1", "Name a color.", 12)).await;
    assert_eq!(alpha1["adapter_version"], 1);
    let texts: Vec<&Value> = [&base, &alpha, &alpha1]
        .iter()
        .map(|r| &r["choices"][0]["message"]["content"])
        .collect();
    assert_ne!(texts[0], texts[1], "the adapter changes the answer");
    assert_ne!(texts[1], texts[2], "versions are distinct weights");

    // max_completion_tokens is an alias of max_tokens; a length stop says so.
    let mut body = chat(BASE_MODEL, "Count from one to fifty in words.", 0);
    body.as_object_mut().unwrap().remove("max_tokens");
    body["max_completion_tokens"] = json!(5);
    let (_, _, short) = post_json(&url, &body).await;
    assert_eq!(short["choices"][0]["finish_reason"], "length");
    assert_eq!(short["usage"]["completion_tokens"], 5);

    // Stop strings end the answer and are not part of it.
    let full = post_json(&url, &chat(BASE_MODEL, "Count from one to ten.", 30))
        .await
        .2;
    let full_text = full["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let stop_at = full_text.split_whitespace().nth(2).expect("a few words");
    let mut body = chat(BASE_MODEL, "Count from one to ten.", 30);
    body["stop"] = json!([stop_at]);
    let stopped = post_json(&url, &body).await.2;
    let stopped_text = stopped["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    assert!(
        !stopped_text.contains(stop_at),
        "{stopped_text:?} / {stop_at:?}"
    );
    assert!(full_text.starts_with(stopped_text));

    // `ignore_eos` (vLLM's extension) generates past the end of the turn to exactly
    // `max_tokens`; the chat format's markers it then meets stay out of the text.
    let question = "What is 2+2? Answer with a number only.";
    let brief = post_json(&url, &chat(BASE_MODEL, question, 40)).await.2;
    assert_eq!(brief["choices"][0]["finish_reason"], "stop", "{brief}");
    let brief_text = brief["choices"][0]["message"]["content"].as_str().unwrap();
    let mut body = chat(BASE_MODEL, question, 40);
    body["ignore_eos"] = json!(true);
    let padded = post_json(&url, &body).await.2;
    assert_eq!(padded["choices"][0]["finish_reason"], "length", "{padded}");
    assert_eq!(padded["usage"]["completion_tokens"], 40);
    let padded_text = padded["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(padded_text.starts_with(brief_text), "{padded_text:?}");
    assert!(padded_text.len() > brief_text.len(), "{padded_text:?}");
    assert!(!padded_text.contains("<|"), "{padded_text:?}");

    // n choices, and a seed makes sampling reproducible.
    let mut body = chat(BASE_MODEL, "Write a word.", 8);
    body["temperature"] = json!(1.0);
    body["seed"] = json!(42);
    body["n"] = json!(2);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (_, _, a) = post_json(&url, &body).await;
    let (_, _, b) = post_json(&url, &body).await;
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    for (x, y) in a["choices"]
        .as_array()
        .unwrap()
        .iter()
        .zip(b["choices"].as_array().unwrap())
    {
        assert_eq!(x["message"], y["message"]);
        // The second request reuses the first one's cached prompt prefix, whose values come
        // from a differently shaped (but equivalent) computation: equal to rounding.
        let tokens = |c: &Value| -> Vec<(String, f64)> {
            c["logprobs"]["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["token"].as_str().unwrap().to_string(),
                        t["logprob"].as_f64().unwrap(),
                    )
                })
                .collect()
        };
        for ((tx, lx), (ty, ly)) in tokens(x).into_iter().zip(tokens(y)) {
            assert_eq!(tx, ty);
            assert!((lx - ly).abs() < 1e-4, "{lx} vs {ly}");
        }
    }
    let content = a["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    for token in content {
        assert!(token["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(token["top_logprobs"].as_array().unwrap().len(), 3);
        assert!(token["bytes"].is_array());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_chat_follows_openai_framing_with_usage() {
    let server = server_with_adapters();
    let mut body = chat("beta", "Say hello.", 10);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let result = post_stream(&server.url("/v1/chat/completions"), &body).await;
    assert!(result.done, "ends with [DONE]");
    let first = &result.chunks[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let id = first["id"].clone();
    let (last, rest) = result.chunks.split_last().unwrap();
    for chunk in rest {
        assert_eq!(chunk["id"], id);
        assert!(
            chunk["usage"].is_null(),
            "usage is null before the last chunk"
        );
        assert_eq!(chunk["adapter_version"], 1);
    }
    assert_eq!(last["choices"], json!([]));
    let finish = rest
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect::<Vec<_>>();
    assert_eq!(finish.len(), 1);
    let completion_tokens = last["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=10).contains(&completion_tokens));
    if finish[0] == "length" {
        assert_eq!(completion_tokens, 10);
    }
    // The same request unstreamed gives the same text.
    let (_, _, whole) = post_json(
        &server.url("/v1/chat/completions"),
        &chat("beta", "Say hello.", 10),
    )
    .await;
    assert_eq!(whole["choices"][0]["message"]["content"], result.text());
    assert_eq!(whole["usage"], last["usage"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_generate_and_score_prompts_with_echo() {
    let server = server_with_adapters();
    let url = server.url("/v1/completions");
    let (status, _, generated) = post_json(
        &url,
        &json!({"model": BASE_MODEL, "prompt": "The capital of France is", "max_tokens": 6,
                "temperature": 0, "logprobs": 2}),
    )
    .await;
    assert_eq!(status, 200, "{generated}");
    assert_eq!(generated["object"], "text_completion");
    let text = generated["choices"][0]["text"].as_str().unwrap();
    let gen_logprobs = generated["choices"][0]["logprobs"]["token_logprobs"].clone();

    // Scoring the prompt plus what was generated gives the same log-probs for those tokens.
    let full = format!("The capital of France is{text}");
    let (status, _, scored) = post_json(
        &url,
        &json!({"model": BASE_MODEL, "prompt": full, "max_tokens": 0, "echo": true, "logprobs": 1}),
    )
    .await;
    assert_eq!(status, 200, "{scored}");
    let choice = &scored["choices"][0];
    assert_eq!(choice["text"], full.as_str());
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), full);
    assert!(
        lp["token_logprobs"][0].is_null(),
        "the first token has no context"
    );
    assert!(lp["top_logprobs"][0].is_null());
    let scored_lps = lp["token_logprobs"].as_array().unwrap();
    let gen = gen_logprobs.as_array().unwrap();
    let tail = &scored_lps[scored_lps.len() - gen.len()..];
    for (g, s) in gen.iter().zip(tail) {
        let (g, s) = (g.as_f64().unwrap(), s.as_f64().unwrap());
        assert!((g - s).abs() < 2e-3, "generated {g} vs scored {s}");
    }
    assert_eq!(scored["usage"]["completion_tokens"], 0);

    // Several prompts (text and token ids), each with its own choice.
    let (status, _, many) = post_json(
        &url,
        &json!({"model": "alpha", "prompt": ["Hello", [19556, 28]], "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{many}");
    assert_eq!(many["choices"].as_array().unwrap().len(), 2);
    assert_eq!(many["choices"][1]["index"], 1);

    // Streaming completions end with [DONE] and carry the same text.
    let streamed = post_stream(
        &url,
        &json!({"model": BASE_MODEL, "prompt": "The capital of France is", "max_tokens": 6,
                "temperature": 0, "stream": true}),
    )
    .await;
    assert!(streamed.done);
    assert_eq!(streamed.text(), text);

    // With `echo`, the stream starts with the prompt.
    let echoed = post_stream(
        &url,
        &json!({"model": BASE_MODEL, "prompt": "The capital of France is", "max_tokens": 6,
                "temperature": 0, "stream": true, "echo": true}),
    )
    .await;
    assert!(echoed.done);
    assert_eq!(echoed.text(), format!("The capital of France is{text}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_input_gets_its_status_and_error_type() {
    let server = Server::start(ServerOptions {
        config: "[server]\nmax_body_bytes = 65536\n".into(),
        ..ServerOptions::default()
    });
    let chat_url = server.url("/v1/chat/completions");
    let completions_url = server.url("/v1/completions");
    let client = common::client();

    let malformed = client
        .post(&chat_url)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    let status = malformed.status().as_u16();
    let headers = malformed.headers().clone();
    let body: Value = malformed.json().await.unwrap();
    assert_error(
        &(status, headers, body),
        400,
        "invalid_request_error",
        None,
        Some("invalid_json"),
    );

    let base = || chat(BASE_MODEL, "Hi", 4);
    let with = |key: &str, value: Value| {
        let mut body = base();
        body[key] = value;
        body
    };
    // (body, status, error type, param, code)
    type Case = (
        Value,
        u16,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            with("temperature", json!("hot")),
            400,
            "invalid_request_error",
            Some("temperature"),
            None,
        ),
        (
            with("temperature", json!(-0.5)),
            400,
            "invalid_request_error",
            Some("temperature"),
            None,
        ),
        (
            with("top_p", json!(1.5)),
            400,
            "invalid_request_error",
            Some("top_p"),
            None,
        ),
        (
            with("max_tokens", json!(0)),
            400,
            "invalid_request_error",
            Some("max_tokens"),
            None,
        ),
        (
            with("max_tokens", json!(-3)),
            400,
            "invalid_request_error",
            Some("max_tokens"),
            None,
        ),
        (
            with("max_tokens", json!(100000)),
            400,
            "invalid_request_error",
            Some("max_tokens"),
            Some("context_length_exceeded"),
        ),
        (
            with("ignore_eos", json!("yes")),
            400,
            "invalid_request_error",
            Some("ignore_eos"),
            None,
        ),
        (
            with("n", json!(0)),
            400,
            "invalid_request_error",
            Some("n"),
            None,
        ),
        (
            with("stop", json!(["a", "b", "c", "d", "e"])),
            400,
            "invalid_request_error",
            Some("stop"),
            None,
        ),
        (
            with("top_logprobs", json!(3)),
            400,
            "invalid_request_error",
            Some("top_logprobs"),
            None,
        ),
        (
            {
                let mut b = with("logprobs", json!(true));
                b["top_logprobs"] = json!(21);
                b
            },
            400,
            "invalid_request_error",
            Some("top_logprobs"),
            None,
        ),
        (
            with("stream_options", json!({"include_usage": true})),
            400,
            "invalid_request_error",
            Some("stream_options"),
            None,
        ),
        (
            with(
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            400,
            "invalid_request_error",
            Some("tools"),
            Some("unsupported_parameter"),
        ),
        (
            with("response_format", json!({"type": "json_object"})),
            400,
            "invalid_request_error",
            Some("response_format"),
            Some("unsupported_parameter"),
        ),
        (
            with("model", json!("no-such-model")),
            404,
            "invalid_request_error",
            Some("model"),
            Some("model_not_found"),
        ),
        (
            with("model", json!("no-such-model@2")),
            404,
            "invalid_request_error",
            Some("model"),
            Some("model_not_found"),
        ),
        (
            with("messages", json!([])),
            400,
            "invalid_request_error",
            Some("messages"),
            None,
        ),
        (
            with("messages", json!("hello")),
            400,
            "invalid_request_error",
            Some("messages"),
            None,
        ),
        (
            with("messages", json!([{"role": "wizard", "content": "x"}])),
            400,
            "invalid_request_error",
            Some("messages[0].role"),
            None,
        ),
        (
            with("messages", json!([{"role": "tool", "content": "x"}])),
            400,
            "invalid_request_error",
            Some("messages[0].role"),
            Some("unsupported_parameter"),
        ),
        (
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            ),
            400,
            "invalid_request_error",
            Some("messages[0].content[0].type"),
            Some("unsupported_parameter"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            400,
            "invalid_request_error",
            None,
            None,
        ),
    ];
    for (body, status, kind, param, code) in cases {
        let response = post_json(&chat_url, &body).await;
        assert_error(&response, status, kind, param, code);
    }

    let completion_cases: Vec<(Value, &str)> = vec![
        (
            json!({"model": BASE_MODEL, "prompt": "", "max_tokens": 3}),
            "prompt",
        ),
        (json!({"model": BASE_MODEL, "prompt": 7}), "prompt"),
        (
            json!({"model": BASE_MODEL, "prompt": [999999999]}),
            "prompt",
        ),
        (
            json!({"model": BASE_MODEL, "prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"model": BASE_MODEL, "prompt": "x", "logprobs": 21}),
            "logprobs",
        ),
        (
            json!({"model": BASE_MODEL, "prompt": "x", "suffix": "y"}),
            "suffix",
        ),
    ];
    for (body, param) in completion_cases {
        let response = post_json(&completions_url, &body).await;
        assert_error(&response, 400, "invalid_request_error", Some(param), None);
    }

    let huge =
        json!({"model": BASE_MODEL, "messages": [{"role": "user", "content": "x".repeat(70_000)}]});
    let response = post_json(&chat_url, &huge).await;
    assert_error(
        &response,
        413,
        "invalid_request_error",
        None,
        Some("request_too_large"),
    );

    let response = client
        .get(server.url("/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let response = client.get(&chat_url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);

    // The server is still healthy after all of that.
    let (status, _, _) = post_json(&chat_url, &base()).await;
    assert_eq!(status, 200);
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_guard_the_api_but_not_the_probes() {
    let server = Server::start(ServerOptions {
        config: "[server]\napi_keys = [\"sk-file\"]\nmetrics_require_key = true\n".into(),
        env: vec![("MEZO_API_KEYS", "sk-env-1,sk-env-2".into())],
        ..ServerOptions::default()
    });
    let client = common::client();
    let models = server.url("/v1/models");
    let missing = client.get(&models).send().await.unwrap();
    assert_eq!(missing.status().as_u16(), 401);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let wrong = client
        .get(&models)
        .bearer_auth("sk-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    for key in ["sk-file", "sk-env-1", "sk-env-2"] {
        let ok = client.get(&models).bearer_auth(key).send().await.unwrap();
        assert_eq!(ok.status().as_u16(), 200, "{key}");
    }
    for open in ["/health", "/ready"] {
        let response = client.get(server.url(open)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{open}");
    }
    let metrics = client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status().as_u16(), 401, "metrics_require_key");
    let metrics = client
        .get(server.url("/metrics"))
        .bearer_auth("sk-file")
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn scoped_keys_reach_their_routes_and_get_403_elsewhere() {
    let server = Server::start(ServerOptions {
        config: "[server]\napi_keys = [\"sk-all\"]\n\
                 [[server.keys]]\nkey = \"sk-app\"\nscopes = [\"inference\"]\nname = \"web app\"\n\
                 [[server.keys]]\nkey = \"sk-tune\"\nscopes = [\"fine_tuning\"]\n"
            .into(),
        ..ServerOptions::default()
    });
    let client = common::client();
    let call = |method: reqwest::Method, path: &str, key: &str| {
        client
            .request(method, server.url(path))
            .bearer_auth(key)
            .json(&json!({}))
            .send()
    };
    use reqwest::Method;
    // (key, method, path, status): 403 only where the key lacks the route's scope.
    let cases = [
        ("sk-app", Method::GET, "/v1/models", 200),
        ("sk-app", Method::POST, "/v1/finetune", 403),
        ("sk-app", Method::GET, "/v1/adapters", 403),
        ("sk-app", Method::DELETE, "/v1/adapters/nobody", 403),
        ("sk-tune", Method::GET, "/v1/finetune", 200),
        ("sk-tune", Method::GET, "/v1/adapters", 200),
        ("sk-tune", Method::POST, "/v1/chat/completions", 403),
        ("sk-tune", Method::POST, "/v1/adapters/nobody/rollback", 403),
        ("sk-tune", Method::GET, "/v1/no_such_route", 404),
        ("sk-all", Method::DELETE, "/v1/adapters/nobody", 404),
        ("sk-wrong", Method::GET, "/v1/models", 401),
    ];
    for (key, method, path, want) in cases {
        let response = call(method.clone(), path, key).await.expect("request");
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, want, "{key} {method} {path}: {body}");
        if status == 403 {
            assert_eq!(body["error"]["type"], "permission_error", "{body}");
            assert_eq!(body["error"]["code"], "missing_scope", "{body}");
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(path) && message.contains("scope"),
                "{message}"
            );
        }
    }
    let (_, err) = {
        let response = call(Method::POST, "/v1/finetune", "sk-app")
            .await
            .expect("request");
        (
            response.status(),
            response.json::<Value>().await.expect("json"),
        )
    };
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("`fine_tuning`") && message.contains("the key has inference"),
        "{message}"
    );

    // Refusals are counted by route; the secrets never reach the log.
    let metrics = common::metrics_text(&server).await;
    let counted = |route: &str, status: &str| {
        metrics.lines().any(|line| {
            line.starts_with("mezo_http_requests_total")
                && line.contains(&format!("route=\"{route}\""))
                && line.contains(&format!("status=\"{status}\""))
        })
    };
    assert!(counted("/v1/finetune", "403"), "{metrics}");
    assert!(counted("/v1/models", "401"), "{metrics}");
    assert!(
        server.log_shows_within("web app", std::time::Duration::from_secs(10)),
        "the refusal names the key: {}",
        server.log()
    );
    let log = server.log();
    for secret in ["sk-all", "sk-app", "sk-tune", "sk-wrong"] {
        assert!(!log.contains(secret), "{secret} is in the log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_at_its_cap_of_requests_in_flight_gets_429_until_one_ends() {
    let server = Server::start(ServerOptions {
        config: "[server]\napi_keys = [\"sk-other\"]\nmax_concurrent_requests_per_key = 4\n\
                 [[server.keys]]\nkey = \"sk-one\"\nscopes = [\"inference\"]\n\
                 max_concurrent_requests = 1\n"
            .into(),
        ..ServerOptions::default()
    });
    let client = common::client();
    let chat = |key: &str, max_tokens: u32| {
        client
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({
                "model": BASE_MODEL,
                "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                "max_tokens": max_tokens,
                "ignore_eos": true,
                "stream": true,
            }))
            .send()
    };
    // A stream holds the key's one place while it runs …
    let long = chat("sk-one", 4000).await.expect("the long stream");
    assert_eq!(long.status(), 200);
    let refused = chat("sk-one", 4).await.expect("a second request");
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.expect("json");
    assert_eq!(
        body["error"]["code"], "too_many_concurrent_requests",
        "{body}"
    );
    // … other keys are not held up by it …
    let other = chat("sk-other", 4).await.expect("another key");
    assert_eq!(other.status(), 200);
    other.text().await.expect("the other stream ends");
    // … and the place comes back when the stream ends (here: its client goes away).
    drop(long);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let again = chat("sk-one", 4).await.expect("a request");
        if again.status() == 200 {
            again.text().await.expect("the stream ends");
            break;
        }
        assert_eq!(again.status(), 429);
        assert!(
            std::time::Instant::now() < deadline,
            "the place never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Polls `/ready` until the scheduler's queue holds `count` sequences (20 s at most).
async fn wait_for_waiting(server: &Server, count: usize) {
    for _ in 0..2000 {
        let (_, ready) = get_json(&server.url("/ready")).await;
        if ready["waiting"] == count {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the queue never held {count} sequences");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_429_with_retry_after() {
    let server = Server::start(ServerOptions {
        config: "[scheduler]\nmax_batch_rows = 1\nmax_waiting = 2\n".into(),
        ..ServerOptions::default()
    });
    let url = server.url("/v1/chat/completions");
    // One long stream occupies the only row …
    // (long enough to outlast the waits below on a loaded machine, whatever the model says)
    let mut long = chat(BASE_MODEL, "Write a long story about a dragon.", 4000);
    long["stream"] = json!(true);
    long["ignore_eos"] = json!(true);
    let response = common::client()
        .post(&url)
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut running = response.bytes_stream();
    use futures_util::StreamExt;
    running.next().await.expect("the first chunk").unwrap();
    // The role chunk goes out before the engine takes the request from the queue: wait until it
    // has (the queue is empty again), or the two choices below would find it still waiting.
    wait_for_waiting(&server, 0).await;
    // … one request with two choices fills the queue (both accepted or neither) …
    let waiting = tokio::spawn({
        let url = url.clone();
        async move {
            let mut body = chat(BASE_MODEL, "Hi", 2);
            body["n"] = json!(2);
            post_json(&url, &body).await.0
        }
    });
    wait_for_waiting(&server, 2).await;
    // … and the next request is refused at once, with Retry-After.
    let refused = post_json(&url, &chat(BASE_MODEL, "Hi", 2)).await;
    assert_error(&refused, 429, "rate_limit_error", None, Some("queue_full"));
    assert!(refused.1.contains_key("retry-after"));
    // Dropping the long stream cancels it, so the waiting request gets its turn.
    drop(running);
    assert_eq!(waiting.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_after_traffic_pass_promtool() {
    let server = server_with_adapters();
    let url = server.url("/v1/chat/completions");
    post_json(&url, &chat(BASE_MODEL, "Hi", 4)).await;
    post_json(&url, &chat("alpha", "Hi", 4)).await;
    let mut streamed = chat("beta", "Hi", 4);
    streamed["stream"] = json!(true);
    post_stream(&url, &streamed).await;
    post_json(&url, &chat("nope", "Hi", 4)).await;
    let response = common::client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    for name in [
        "mezo_http_requests_total{",
        "mezo_time_to_first_token_seconds_bucket{",
        "mezo_e2e_request_latency_seconds_bucket{",
        "mezo_time_per_output_token_seconds_bucket{",
        "mezo_prompt_tokens_total{",
        "mezo_generation_tokens_total{",
        "mezo_requests_running ",
        "mezo_requests_waiting ",
        "mezo_engine_batch_rows_bucket{",
        "mezo_engine_step_seconds_bucket{",
        "mezo_model_weights_bytes ",
        "mezo_adapter_weights_bytes ",
        "mezo_process_resident_memory_bytes ",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    assert!(
        text.contains(r#"model="alpha""#) && text.contains(r#"status="404""#),
        "{text}"
    );
    let promtool = common::promtool_check(&text);
    assert!(
        promtool.0,
        "promtool check metrics failed:\n{}\n{text}",
        promtool.1
    );
}

/// Every operation of `/openapi.json` reaches a handler (not the fallback's "no route" 404 or its
/// 405), and every other method on its paths is 405: the spec and the router name the same
/// routes. (The router has no routes of its own beside the spec's: `api::app` builds it from
/// `api::routes`, which registers each handler with its spec entry.)
#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_spec_and_the_router_name_the_same_routes() {
    let server = Server::start(ServerOptions::default());
    let (status, spec) = get_json(&server.url("/openapi.json")).await;
    assert_eq!(status, 200);
    assert!(
        spec["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        spec["openapi"]
    );
    let paths = spec["paths"].as_object().expect("paths");
    assert_eq!(paths.len(), 30, "{:?}", paths.keys().collect::<Vec<_>>());
    let methods = ["get", "post", "put", "delete", "patch"];
    let mut operations = 0;
    for (template, item) in paths {
        // A model id may contain `/`: the router takes the rest of the path.
        let path = template
            .replace("/v1/models/{id}", "/v1/models/org/model")
            .replace("{id}", "x")
            .replace("{name}", "x");
        for method in methods {
            let documented = item.get(method).is_some();
            let verb = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("verb");
            let body = matches!(method, "post" | "put").then(|| json!({}));
            let (status, answer) =
                common::request_json(verb, &server.url(&path), body.as_ref()).await;
            let message = answer["error"]["message"].as_str().unwrap_or("");
            let unrouted = (status == 404 && message.starts_with("no route "))
                || answer["error"]["code"] == "method_not_allowed";
            if documented {
                operations += 1;
                assert!(
                    !unrouted,
                    "{method} {template} is in the spec but not routed: {status} {answer}"
                );
            } else {
                assert_eq!(
                    (status, answer["error"]["code"].as_str()),
                    (405, Some("method_not_allowed")),
                    "{method} {template} is routed but not in the spec: {answer}"
                );
            }
        }
    }
    assert_eq!(operations, 36);
    let (status, answer) = get_json(&server.url("/v1/not-a-route")).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
}

/// Found by the schema fuzzer: an upload without a multipart body got axum's plain-text 400.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_that_is_not_multipart_gets_a_json_error_naming_the_file() {
    let server = Server::start(ServerOptions::default());
    for content_type in [None, Some("application/json"), Some("multipart/form-data")] {
        let mut request = common::client()
            .post(server.url("/v1/files"))
            .body("{\"purpose\": \"fine-tune\"}");
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.expect("POST /v1/files");
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("a JSON error");
        assert_eq!(status, 400, "{content_type:?}: {body}");
        assert_eq!(body["error"]["param"], "file", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("multipart/form-data")),
            "{body}"
        );
    }
}

/// A path segment that does not decode (invalid UTF-8 once percent-decoded) is a JSON 400
/// naming it, like every other error, not axum's plain text.
#[tokio::test(flavor = "multi_thread")]
async fn an_undecodable_path_gets_a_json_error() {
    let server = Server::start(ServerOptions::default());
    for (path, param) in [
        ("/v1/files/%FF", "path"),
        ("/v1/finetune/%C3%28/events", "path"),
        ("/v1/models/%FF", "path"),
    ] {
        let (status, body) = get_json(&server.url(path)).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["param"], param, "{path}: {body}");
    }
}

/// Found by the schema fuzzer: `limit=0` on a job's checkpoints gave an empty page, and
/// `stream=null` on a job's events read as "not streaming"; both are outside the spec.
#[tokio::test(flavor = "multi_thread")]
async fn a_zero_limit_or_a_stream_flag_that_is_not_a_boolean_is_refused() {
    let server = Server::start(ServerOptions::default());
    for (path, param) in [
        ("/v1/fine_tuning/jobs/x/checkpoints?limit=0", "limit"),
        ("/v1/finetune/x/events?limit=0", "limit"),
        ("/v1/finetune/x/events?limit=1001", "limit"),
        ("/v1/finetune/x/events?stream=null", "stream"),
        ("/v1/finetune/x/events?stream=yes", "stream"),
    ] {
        let (status, body) = get_json(&server.url(path)).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["param"], param, "{path}: {body}");
    }
    let (status, body) = get_json(&server.url("/v1/finetune/x/events?stream=false")).await;
    assert_eq!(
        status, 404,
        "an unknown job, once the query is valid: {body}"
    );
    // Also found by the fuzzer: `steps: 0` was accepted when `feedback_every` was null. The
    // service checks `steps` on its own, whether training is turned on or off.
    for (settings, param) in [
        (json!({"feedback_every": null, "steps": 0}), "steps"),
        (json!({"feedback_every": 5, "steps": 0}), "steps"),
        (
            json!({"feedback_every": 5, "steps": 1_000_000_000u64}),
            "steps",
        ),
        (json!({"feedback_every": 0, "steps": 5}), "feedback_every"),
    ] {
        let (status, body) = common::request_json(
            reqwest::Method::PUT,
            &server.url("/v1/adapters/x/continuous_training"),
            Some(&settings),
        )
        .await;
        assert_eq!(status, 400, "{settings}: {body}");
        assert_eq!(body["error"]["param"], param, "{settings}: {body}");
    }
}
