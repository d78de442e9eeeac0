//! One engine call with every adapter of a step against one call per adapter: the same losses,
//! bit for bit.
//!
//! The tiny engine computes each adapter's rows on their own, so any difference would come from
//! the plugin (wrong order of adapters, different perturbations, a different batch).

use plugin::objectives::{AnswerMetric, Classification, Completion, GreedyAnswer};
use plugin::{
    Estimator, EvalMode, Objective, Optimizer, OptimizerState, SpsaStep, StepRecord,
    TrainedTensors, TrainingExample,
};

use crate::gradient::completion_examples;
use crate::tiny_model::{adapter_with_nonzero_b, TinyModel};

fn estimate(
    model: &TinyModel,
    objective: &dyn Objective,
    examples: &[TrainingExample],
    eval_mode: EvalMode,
    estimator: Estimator,
) -> StepRecord {
    let step = SpsaStep {
        step: 3,
        seeds: vec![11, 12, 13],
        // Large enough to change greedy answers, so that F1 gives non-zero g somewhere.
        epsilon: 0.5,
        lr: 1e-3,
        weight_decay: 0.0,
        max_projected_grad: None,
        eval_mode,
        estimator,
        split_batch: false,
    };
    let batch: Vec<_> = examples.iter().collect();
    let state = OptimizerState::new(Optimizer::Sgd, TrainedTensors::All);
    step.estimate(model, objective, &adapter_with_nonzero_b(5), &state, &batch)
        .unwrap()
}

fn loss_bits(record: &StepRecord) -> Vec<u32> {
    [record.loss_plus, record.loss_minus]
        .iter()
        .chain(&record.projected_grads)
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn one_forward_and_two_forwards_give_the_same_losses() {
    let model = TinyModel::new(3);
    let classification: Vec<TrainingExample> = [("good film", 1), ("bad acting", 0), ("fine", 1)]
        .into_iter()
        .map(|(prompt, label)| TrainingExample::Classification {
            prompt: prompt.into(),
            candidates: vec![" no".into(), " yes".into()],
            label,
        })
        .collect();
    // References that greedy decoding produces under one of θ ± 0.5z for seed 12, 11 and 13
    // respectively (and not under θ), so that every seed sees L+ ≠ L−.
    let generation: Vec<TrainingExample> = [("abc", "ndd"), ("ba", "jjj"), ("hello", "aam")]
        .into_iter()
        .map(|(prompt, reference)| TrainingExample::Generation {
            prompt: prompt.into(),
            references: vec![reference.into()],
        })
        .collect();
    let cases: [(&dyn Objective, Vec<TrainingExample>); 3] = [
        (&Completion, completion_examples()),
        (&Classification::CROSS_ENTROPY, classification),
        (
            &GreedyAnswer {
                metric: AnswerMetric::TokenF1,
                max_new_tokens: 3,
            },
            generation,
        ),
    ];
    for (objective, examples) in cases {
        for estimator in [Estimator::Central, Estimator::Fzoo] {
            let one = estimate(
                &model,
                objective,
                &examples,
                EvalMode::OneForward,
                estimator,
            );
            let two = estimate(
                &model,
                objective,
                &examples,
                EvalMode::TwoForwards,
                estimator,
            );
            let name = objective.name();
            assert_eq!(loss_bits(&one), loss_bits(&two), "{name}, {estimator:?}");
            assert_eq!(one, two);
            if estimator == Estimator::Central {
                assert!(one.projected_grads.iter().all(|&g| g != 0.0), "{one:?}");
            }
        }
    }
}

#[test]
fn one_forward_sends_every_adapter_of_the_step_in_one_call() {
    let model = TinyModel::new(3);
    let examples = completion_examples();
    let calls = |eval_mode, estimator| {
        model.score_calls.borrow_mut().clear();
        estimate(&model, &Completion, &examples, eval_mode, estimator);
        model.score_calls.borrow().clone()
    };
    // Three seeds: θ ± εz for each (central), or θ and θ + εz for each (FZOO).
    assert_eq!(calls(EvalMode::OneForward, Estimator::Central), [6]);
    assert_eq!(calls(EvalMode::TwoForwards, Estimator::Central), [1; 6]);
    assert_eq!(calls(EvalMode::OneForward, Estimator::Fzoo), [4]);
    assert_eq!(calls(EvalMode::TwoForwards, Estimator::Fzoo), [1; 4]);
}
