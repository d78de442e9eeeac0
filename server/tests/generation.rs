//! Generation on the real model: the golden greedy continuations through tokenizer and chat
//! template, batching that does not change answers, reproducible sampling, stop rules, streaming,
//! and the context limit.

mod common;

use std::sync::OnceLock;

use mezo_server::engine::batch::{BatchRow, RowCache};
use mezo_server::engine::chat_template::ChatMessage;
use mezo_server::engine::generate::{
    generate, FinishReason, GenerationParams, Sequence, StopConditions,
};
use mezo_server::engine::loaded_model::LoadedModel;
use mezo_server::engine::sampler::SamplingParams;
use mezo_server::engine::weights::WeightMode;
use mezo_server::engine::EngineError;

fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| LoadedModel::load(&common::model_path(), WeightMode::F32).expect("load"))
}

fn params(max_tokens: usize, sampling: SamplingParams) -> GenerationParams {
    GenerationParams {
        max_tokens,
        sampling,
        stop: StopConditions {
            token_ids: model().tokenizer.eog_ids(),
            ignore_eos: false,
            strings: Vec::new(),
        },
        top_logprobs: None,
    }
}

fn chat_prompt(user: &str) -> Vec<u32> {
    let m = model();
    let messages = [ChatMessage {
        role: "user".into(),
        content: user.into(),
    }];
    let text = m
        .chat_template()
        .expect("a chat model")
        .render(&messages, true)
        .expect("render");
    m.tokenizer.encode(&text, true)
}

fn run(seqs: &mut [Sequence]) -> Vec<String> {
    let m = model();
    let mut streamed = vec![String::new(); seqs.len()];
    generate(&m.transformer, &m.tokenizer, seqs, |i, event| {
        streamed[i].push_str(&event.text)
    })
    .expect("generate");
    for (seq, text) in seqs.iter().zip(&streamed) {
        assert_eq!(
            seq.text(),
            text,
            "streamed text must add up to the final text"
        );
    }
    streamed
}

#[test]
fn greedy_chat_continuations_match_the_reference() {
    check_greedy_golden(model());
}

#[test]
fn quantized_mode_decodes_the_same_greedy_continuations() {
    let quantized = LoadedModel::load(&common::model_path(), WeightMode::Quantized).expect("load");
    check_greedy_golden(&quantized);
}

fn check_greedy_golden(m: &LoadedModel) {
    let golden = common::golden();
    for case in golden["cases"].as_array().expect("cases") {
        if case["kind"] != "chat" {
            continue;
        }
        let messages: Vec<ChatMessage> =
            serde_json::from_value(case["messages"].clone()).expect("messages");
        let rendered = m
            .chat_template()
            .expect("a chat model")
            .render(&messages, true)
            .expect("render");
        let prompt = m.tokenizer.encode(&rendered, true);
        assert_eq!(prompt, common::ids_of(case, "ids"));
        let want = common::ids_of(case, "greedy_16");
        let mut seqs = [Sequence::new(
            &m.transformer,
            prompt,
            None,
            params(16, SamplingParams::greedy()),
        )
        .expect("sequence")];
        run(&mut seqs);
        assert_eq!(seqs[0].generated(), want.as_slice());
    }
}

#[test]
fn batching_does_not_change_greedy_answers() {
    let m = model();
    let prompts = [
        "What is 2+2?",
        "Name a primary color.",
        "Write a haiku about rust.",
    ];
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut seqs = [Sequence::new(
                &m.transformer,
                chat_prompt(p),
                None,
                params(24, SamplingParams::greedy()),
            )
            .expect("sequence")];
            run(&mut seqs);
            seqs[0].generated().to_vec()
        })
        .collect();
    let mut together: Vec<Sequence> = prompts
        .iter()
        .map(|p| {
            Sequence::new(
                &m.transformer,
                chat_prompt(p),
                None,
                params(24, SamplingParams::greedy()),
            )
            .expect("sequence")
        })
        .collect();
    run(&mut together);
    for (seq, want) in together.iter().zip(&alone) {
        assert_eq!(seq.generated(), want.as_slice());
    }
}

#[test]
fn sampling_is_reproducible_per_seed() {
    let m = model();
    let sample = |seed| {
        let sampling = SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            top_k: 50,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        let mut seqs = [Sequence::new(
            &m.transformer,
            chat_prompt("Tell me a story."),
            None,
            params(24, sampling),
        )
        .expect("sequence")];
        run(&mut seqs);
        seqs[0].generated().to_vec()
    };
    assert_eq!(sample(11), sample(11));
    assert_ne!(sample(11), sample(12));
}

#[test]
fn stop_strings_end_the_output_before_them_and_max_tokens_reports_length() {
    let m = model();
    let mut with_stop = params(16, SamplingParams::greedy());
    with_stop.stop.strings = vec![" is 4".into()];
    let mut seqs = [
        Sequence::new(&m.transformer, chat_prompt("What is 2+2?"), None, with_stop)
            .expect("sequence"),
        Sequence::new(
            &m.transformer,
            chat_prompt("What is 2+2?"),
            None,
            params(3, SamplingParams::greedy()),
        )
        .expect("sequence"),
    ];
    let texts = run(&mut seqs);
    assert_eq!(texts[0], "The answer to this classic math problem");
    assert_eq!(seqs[0].finish_reason(), Some(FinishReason::Stop));
    assert_eq!(seqs[1].generated().len(), 3);
    assert_eq!(seqs[1].finish_reason(), Some(FinishReason::Length));
    assert_eq!(texts[1], "The answer to");
}

#[test]
fn end_of_turn_token_stops_with_reason_stop_and_adds_no_text() {
    let m = model();
    let mut seqs = [Sequence::new(
        &m.transformer,
        chat_prompt("What is 2+2?"),
        None,
        params(32, SamplingParams::greedy()),
    )
    .expect("sequence")];
    let texts = run(&mut seqs);
    assert_eq!(texts[0], "The answer to this classic math problem is 4.");
    assert_eq!(seqs[0].finish_reason(), Some(FinishReason::Stop));
}

#[test]
fn prompts_past_the_context_are_refused_with_the_limit() {
    let m = model();
    let limit = m.transformer.config.context_length;
    let err = Sequence::new(
        &m.transformer,
        vec![198; limit],
        None,
        params(8, SamplingParams::greedy()),
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::ContextOverflow { .. }), "{err}");
    assert!(err.to_string().contains(&limit.to_string()), "{err}");
    let err = Sequence::new(
        &m.transformer,
        vec![],
        None,
        params(8, SamplingParams::greedy()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    // A forward (scoring, training) past the context says so, without a generation budget.
    let tokens = vec![198; limit + 1];
    let mut rows = [BatchRow::last_logits(&tokens, RowCache::None, None)];
    let err = m.transformer.forward(&mut rows).unwrap_err();
    assert!(
        matches!(err, EngineError::InputTooLong { tokens, .. } if tokens == limit + 1),
        "{err}"
    );
    assert!(!err.to_string().contains("generate"), "{err}");
}
