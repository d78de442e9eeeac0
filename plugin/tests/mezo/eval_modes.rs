//! One engine call with both adapters against two calls: the same L+ and L−, bit for bit.
//!
//! The tiny engine computes each adapter's rows on their own, so any difference would come from
//! the plugin (wrong order of adapters, different perturbations, a different batch).

use plugin::objectives::{Classification, Completion, TokenF1};
use plugin::{EvalMode, Objective, SpsaStep, StepRecord, TrainedTensors, TrainingExample};

use crate::gradient::completion_examples;
use crate::tiny_model::{adapter_with_nonzero_b, TinyModel};

fn estimate(
    model: &TinyModel,
    objective: &dyn Objective,
    examples: &[TrainingExample],
    eval_mode: EvalMode,
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
        trained_tensors: TrainedTensors::All,
        split_batch: false,
    };
    let batch: Vec<_> = examples.iter().collect();
    step.estimate(model, objective, &adapter_with_nonzero_b(5), &batch)
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
        (&Classification, classification),
        (&TokenF1 { max_new_tokens: 3 }, generation),
    ];
    for (objective, examples) in cases {
        let one = estimate(&model, objective, &examples, EvalMode::OneForward);
        let two = estimate(&model, objective, &examples, EvalMode::TwoForwards);
        assert_eq!(loss_bits(&one), loss_bits(&two), "{}", objective.name());
        assert_eq!(one, two);
        assert!(one.projected_grads.iter().all(|&g| g != 0.0), "{one:?}");
    }
}

#[test]
fn one_forward_sends_both_adapters_in_one_call_per_seed() {
    let model = TinyModel::new(3);
    let examples = completion_examples();
    estimate(&model, &Completion, &examples, EvalMode::OneForward);
    assert_eq!(*model.score_calls.borrow(), [2, 2, 2]);
    model.score_calls.borrow_mut().clear();
    estimate(&model, &Completion, &examples, EvalMode::TwoForwards);
    assert_eq!(*model.score_calls.borrow(), [1, 1, 1, 1, 1, 1]);
}
