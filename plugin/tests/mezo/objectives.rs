//! Each objective's loss on a tiny case computed by hand, through the fake engine.
//!
//! Fake log-probs: "a" −0.5, "b" −1.0, "c" −1.5, "d" −2.0, "e" −2.5, plus the adapter's shift.
//! All of them are multiples of 2⁻⁴, so the expected means below are exact in f64.

use plugin::objectives::{AnswerMetric, Classification, Completion, GreedyAnswer, Reward};
use plugin::{Objective, TrainError, TrainingExample};

use crate::fake_engine::{shifted_adapter, FakeEngine};

fn completion(prompt: &str, completion: &str) -> TrainingExample {
    TrainingExample::Completion {
        prompt: prompt.into(),
        completion: completion.into(),
    }
}

fn classification(candidates: &[&str], label: usize) -> TrainingExample {
    TrainingExample::Classification {
        prompt: "x".into(),
        candidates: candidates.iter().map(|c| c.to_string()).collect(),
        label,
    }
}

fn reward(completion: &str, reward: f32) -> TrainingExample {
    TrainingExample::Reward {
        prompt: "x".into(),
        completion: completion.into(),
        reward,
    }
}

fn losses(
    objective: &dyn Objective,
    engine: &FakeEngine,
    shifts: &[f32],
    batch: &[TrainingExample],
) -> Vec<f64> {
    let adapters: Vec<_> = shifts.iter().map(|&s| shifted_adapter(s)).collect();
    let adapters: Vec<_> = adapters.iter().collect();
    let batch: Vec<_> = batch.iter().collect();
    objective.losses(engine, &adapters, &batch).unwrap()
}

#[test]
fn completion_loss_is_the_mean_over_items_of_the_mean_token_nll() {
    let engine = FakeEngine::default();
    let batch = [completion("x", "ab"), completion("yy", "c")];
    // Item 1: NLL of "ab" = (0.5 + 1.0)/2 = 0.75; item 2: "c" = 1.5. Mean: 1.125.
    // Shift 0.25 raises every log-prob by 0.25: 0.5 and 1.25, mean 0.875.
    assert_eq!(
        losses(&Completion, &engine, &[0.0, 0.25], &batch),
        [1.125, 0.875]
    );
    // The prompt's tokens are never scored: a longer prompt changes nothing here.
    let longer = [
        completion("a much longer prompt", "ab"),
        completion("yy", "c"),
    ];
    assert_eq!(losses(&Completion, &engine, &[0.0], &longer), [1.125]);
}

#[test]
fn prompts_are_tokenized_with_special_tokens_and_completions_without() {
    let engine = FakeEngine::default();
    losses(
        &Completion,
        &engine,
        &[0.0],
        &[completion("<|im_start|>user", "ab")],
    );
    assert_eq!(
        *engine.tokenized.borrow(),
        [
            ("<|im_start|>user".to_string(), true),
            ("ab".to_string(), false)
        ]
    );
}

#[test]
fn classification_loss_is_cross_entropy_over_mean_log_prob_scores() {
    let engine = FakeEngine::default();
    // Candidate "ce" scores (−1.5 − 2.5)/2 = −2.0, candidate "a" −0.5.
    // log Σ exp = ln(e^−2 + e^−0.5) = −0.29858672201724756 (Python's math.log/math.exp), so
    // label 0: −0.2985867… + 2.0 = 1.7014132779827524; label 1: 0.20141327798275244.
    let expected = (1.701_413_277_982_752_4 + 0.201_413_277_982_752_44) / 2.0;
    let loss = losses(
        &Classification::CROSS_ENTROPY,
        &engine,
        &[0.0],
        &[
            classification(&["ce", "a"], 0),
            classification(&["ce", "a"], 1),
        ],
    );
    assert!((loss[0] - expected).abs() < 1e-14, "{loss:?}");
    // The mean (not the sum) of log-probs: "aaaa" scores −0.5 like "a", so both candidates tie
    // and the loss is ln 2 whatever the label.
    let tie = losses(
        &Classification::CROSS_ENTROPY,
        &engine,
        &[0.0],
        &[classification(&["aaaa", "a"], 0)],
    );
    assert!((tie[0] - std::f64::consts::LN_2).abs() < 1e-15, "{tie:?}");
    // A shift moves every candidate alike: softmax is unchanged.
    let shifted = losses(
        &Classification::CROSS_ENTROPY,
        &engine,
        &[0.0, 1.0],
        &[classification(&["ce", "a"], 0)],
    );
    assert!((shifted[0] - shifted[1]).abs() < 1e-14);
}

#[test]
fn accuracy_loss_is_minus_the_fraction_of_argmax_hits() {
    let engine = FakeEngine::default();
    // "a" (−0.5) beats "ce" (−2.0): right for label 1, wrong for label 0.
    let batch = [
        classification(&["ce", "a"], 0),
        classification(&["ce", "a"], 1),
        classification(&["b", "ce", "a"], 2),
        classification(&["a", "b"], 0),
    ];
    assert_eq!(
        losses(&Classification::ACCURACY, &engine, &[0.0], &batch),
        [-0.75]
    );

    let adapter = shifted_adapter(0.0);
    let batch: Vec<_> = batch.iter().collect();
    let evaluation = Classification::ACCURACY
        .evaluate(&engine, &adapter, &batch)
        .unwrap();
    assert_eq!(evaluation.loss, -0.75);
    assert_eq!(evaluation.metrics["accuracy"], 0.75);
    let classification = Classification::CROSS_ENTROPY
        .evaluate(&engine, &adapter, &batch)
        .unwrap();
    assert_eq!(classification.metrics["accuracy"], 0.75);
    assert_eq!(classification.loss, classification.metrics["cross_entropy"]);
}

#[test]
fn reward_loss_favours_rewarded_completions_and_disfavours_penalised_ones() {
    let engine = FakeEngine::default();
    // −r × mean log-prob: "ab" has mean log-prob −0.75, "c" −1.5.
    // r = 1: 0.75; r = −0.5: −0.5 × 1.5 = −0.75; mean 0.
    assert_eq!(
        losses(
            &Reward,
            &engine,
            &[0.0],
            &[reward("ab", 1.0), reward("c", -0.5)]
        ),
        [0.0]
    );
    // Making the completion likelier (shift +0.25) lowers the loss when r > 0 …
    assert_eq!(
        losses(&Reward, &engine, &[0.0, 0.25], &[reward("ab", 1.0)]),
        [0.75, 0.5]
    );
    // … and raises it when r < 0, so MeZO pushes penalised completions down.
    assert_eq!(
        losses(&Reward, &engine, &[0.0, 0.25], &[reward("ab", -1.0)]),
        [-0.75, -0.5]
    );
}

fn generation(prompt: &str, references: &[&str]) -> TrainingExample {
    TrainingExample::Generation {
        prompt: prompt.into(),
        references: references.iter().map(|r| r.to_string()).collect(),
    }
}

#[test]
fn f1_and_exact_match_grade_greedy_answers_under_each_adapter() {
    let engine = FakeEngine {
        answers: vec![
            (0.0, vec!["Eiffel Tower, Paris".into(), "paris!".into()]),
            (1.0, vec!["the Eiffel tower".into(), "London".into()]),
        ],
        ..FakeEngine::default()
    };
    let batch = [
        generation("q1", &["The Eiffel Tower"]),
        generation("q2", &["the city of Paris", "Paris"]),
    ];
    // Shift 0: F1 0.8 (3 answer words, 2 shared with the 2 reference words) and 1.0 (the second
    // reference), mean 0.9; exact match 0 and 1, mean 0.5.
    // Shift 1: F1 1.0 and 0.0, mean 0.5; exact match 1 and 0, mean 0.5.
    let f1 = losses(
        &GreedyAnswer {
            metric: AnswerMetric::TokenF1,
            max_new_tokens: 8,
        },
        &engine,
        &[0.0, 1.0],
        &batch,
    );
    assert!((f1[0] + 0.9).abs() < 1e-12 && f1[1] == -0.5, "{f1:?}");
    assert_eq!(
        losses(
            &GreedyAnswer {
                metric: AnswerMetric::ExactMatch,
                max_new_tokens: 8
            },
            &engine,
            &[0.0, 1.0],
            &batch
        ),
        [-0.5, -0.5]
    );

    let adapter = shifted_adapter(0.0);
    let batch: Vec<_> = batch.iter().collect();
    let evaluation = GreedyAnswer {
        metric: AnswerMetric::ExactMatch,
        max_new_tokens: 8,
    }
    .evaluate(&engine, &adapter, &batch)
    .unwrap();
    assert_eq!(evaluation.loss, -0.5);
    assert!((evaluation.metrics["token_f1"] - 0.9).abs() < 1e-12);
}

#[test]
fn an_objective_rejects_examples_of_another_kind() {
    let engine = FakeEngine::default();
    let adapter = shifted_adapter(0.0);
    let example = completion("x", "a");
    let err = Classification::CROSS_ENTROPY
        .losses(&engine, &[&adapter], &[&example])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "example 0 is a completion example, but objective `classification` needs classification examples"
    );
}

#[test]
fn engine_failures_and_malformed_answers_are_errors_not_panics() {
    let engine = FakeEngine {
        answers: vec![(0.0, vec!["a".into()])],
        ..FakeEngine::default()
    };
    let objective = GreedyAnswer {
        metric: AnswerMetric::TokenF1,
        max_new_tokens: 4,
    };
    let (known, unknown) = (shifted_adapter(0.0), shifted_adapter(2.0));
    let one = generation("q", &["a"]);
    let err = objective
        .losses(&engine, &[&known, &unknown], &[&one])
        .unwrap_err();
    assert!(matches!(err, TrainError::Engine(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "engine: no answers for an adapter with shift 2"
    );

    // Two prompts, one answer back.
    let err = objective
        .losses(&engine, &[&known], &[&one, &one])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the engine returned 1 generations where 2 generations were expected"
    );
}
