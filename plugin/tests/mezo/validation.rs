//! Every configuration and example the trainer cannot use is rejected before any forward pass,
//! with a message naming the field, the limit and the value given.

use plugin::objectives::{Classification, Completion};
use plugin::{
    LrSchedule, Objective, ObjectiveKind, TrainError, Trainer, TrainerConfig, TrainingExample,
};

use crate::fake_engine::shifted_adapter;

fn completions(n: usize) -> Vec<TrainingExample> {
    (0..n)
        .map(|i| TrainingExample::Completion {
            prompt: format!("p{i}"),
            completion: "c".into(),
        })
        .collect()
}

fn classifications(n: usize) -> Vec<TrainingExample> {
    (0..n)
        .map(|_| TrainingExample::Classification {
            prompt: "p".into(),
            candidates: vec!["a".into(), "b".into()],
            label: 0,
        })
        .collect()
}

fn error(
    config: TrainerConfig,
    objective: Box<dyn Objective>,
    train: Vec<TrainingExample>,
    held_out: Vec<TrainingExample>,
) -> String {
    match Trainer::new(config, objective, shifted_adapter(0.0), train, held_out) {
        Ok(_) => panic!("accepted"),
        Err(err) => err.to_string(),
    }
}

fn config_error(config: TrainerConfig) -> String {
    error(config, Box::new(Completion), completions(16), vec![])
}

#[test]
fn bad_hyperparameters_are_rejected() {
    let base = TrainerConfig::default();
    let cases = [
        (
            TrainerConfig {
                epsilon: 0.0,
                ..base.clone()
            },
            "`epsilon` must be a finite number > 0 (given 0)",
        ),
        (
            TrainerConfig {
                epsilon: -1e-3,
                ..base.clone()
            },
            "`epsilon` must be a finite number > 0 (given -0.001)",
        ),
        (
            TrainerConfig {
                lr: 0.0,
                ..base.clone()
            },
            "`lr` must be a finite number > 0 (given 0)",
        ),
        (
            TrainerConfig {
                lr: f32::INFINITY,
                ..base.clone()
            },
            "`lr` must be a finite number > 0 (given inf)",
        ),
        (
            TrainerConfig {
                n_perturbations: 0,
                ..base.clone()
            },
            "`n_perturbations` must be at least 1 (given 0)",
        ),
        (
            TrainerConfig {
                batch_size: 0,
                ..base.clone()
            },
            "`batch_size` must be at least 1 (given 0)",
        ),
        (
            TrainerConfig {
                batch_size: 17,
                ..base.clone()
            },
            "`batch_size` must be at most the number of training examples, 16 (given 17)",
        ),
        (
            TrainerConfig {
                weight_decay: -0.1,
                ..base.clone()
            },
            "`weight_decay` must be a finite number ≥ 0 (given -0.1)",
        ),
        (
            TrainerConfig {
                max_projected_grad: Some(0.0),
                ..base.clone()
            },
            "`max_projected_grad` must be a finite number > 0 (given 0)",
        ),
        (
            TrainerConfig {
                max_steps: 0,
                ..base.clone()
            },
            "`max_steps` must be at least 1 (given 0)",
        ),
        (
            TrainerConfig {
                optimizer: plugin::Optimizer::Adam {
                    beta1: 0.9,
                    beta2: -0.5,
                    epsilon: 1e-8,
                },
                ..base.clone()
            },
            "`optimizer.beta2` must be in [0, 1) (given -0.5)",
        ),
        (
            TrainerConfig {
                estimator: plugin::Estimator::Central,
                n_perturbations: 3,
                split_batch: true,
                ..base.clone()
            },
            "`batch_size` must be a multiple of n_perturbations (3) with split_batch (given 16)",
        ),
        (
            TrainerConfig {
                eval_every: 0,
                ..base.clone()
            },
            "`eval_every` must be at least 1 (given 0)",
        ),
        (
            TrainerConfig {
                early_stopping_patience: Some(0),
                ..base.clone()
            },
            "`early_stopping_patience` must be at least 1 when set (given 0)",
        ),
        (
            TrainerConfig {
                early_stopping_patience: Some(3),
                ..base.clone()
            },
            "`early_stopping_patience` must be unset when no held-out examples are given (given 3)",
        ),
        (
            TrainerConfig {
                lr_schedule: LrSchedule::Linear {
                    final_fraction: 1.5,
                },
                ..base.clone()
            },
            "`lr_schedule.final_fraction` must be in [0, 1] (given 1.5)",
        ),
    ];
    for (config, message) in cases {
        assert_eq!(config_error(config), message);
    }
    assert!(matches!(
        TrainerConfig {
            epsilon: 0.0,
            ..base
        }
        .validate(),
        Err(TrainError::InvalidConfig {
            field: "epsilon",
            ..
        })
    ));
}

#[test]
fn bad_examples_are_rejected_with_their_index() {
    let config = || TrainerConfig {
        batch_size: 2,
        ..TrainerConfig::default()
    };
    let mut bad_label = classifications(3);
    bad_label[2] = TrainingExample::Classification {
        prompt: "p".into(),
        candidates: vec!["a".into(), "b".into()],
        label: 2,
    };
    assert_eq!(
        error(
            config(),
            Box::new(Classification::CROSS_ENTROPY),
            bad_label,
            vec![]
        ),
        "example 2: `label` must be an index into `candidates`, < 2 (given 2)"
    );

    let mut no_candidates = classifications(3);
    no_candidates[1] = TrainingExample::Classification {
        prompt: "p".into(),
        candidates: vec![],
        label: 0,
    };
    assert_eq!(
        error(
            config(),
            Box::new(Classification::CROSS_ENTROPY),
            no_candidates,
            vec![]
        ),
        "example 1: `candidates` must be a list of at least 2 completions (given 0 candidates)"
    );

    let mut empty_completion = completions(3);
    empty_completion[0] = TrainingExample::Completion {
        prompt: "p".into(),
        completion: String::new(),
    };
    assert_eq!(
        error(config(), Box::new(Completion), empty_completion, vec![]),
        "example 0: `completion` must be non-empty text (given \"\")"
    );

    let reward = |reward| TrainingExample::Reward {
        prompt: "p".into(),
        completion: "c".into(),
        reward,
    };
    let reward_objective = ObjectiveKind::Reward.build().unwrap();
    assert_eq!(
        error(
            config(),
            reward_objective,
            vec![reward(0.5), reward(-2.0)],
            vec![]
        ),
        "example 1: `reward` must be in [-1, 1] (given -2)"
    );

    assert_eq!(
        error(config(), Box::new(Classification::CROSS_ENTROPY), completions(2), vec![]),
        "example 0 is a completion example, but objective `classification` needs classification examples"
    );
    // Held-out examples are checked too, and say so.
    let mut held_out = classifications(2);
    held_out[1] = TrainingExample::Classification {
        prompt: "p".into(),
        candidates: vec!["a".into(), "b".into()],
        label: 5,
    };
    assert_eq!(
        error(
            config(),
            Box::new(Classification::CROSS_ENTROPY),
            classifications(2),
            held_out
        ),
        "held-out example 1: `label` must be an index into `candidates`, < 2 (given 5)"
    );
}

#[test]
fn objective_kinds_parse_and_build() {
    let kind: ObjectiveKind = serde_json::from_str(r#"{"type": "f1"}"#).unwrap();
    assert_eq!(kind, ObjectiveKind::TokenF1 { max_new_tokens: 32 });
    assert_eq!(kind.build().unwrap().name(), "token_f1");
    let kinds = [
        (r#"{"type": "completion"}"#, "completion"),
        (r#"{"type": "classification"}"#, "classification"),
        (r#"{"type": "accuracy"}"#, "accuracy"),
        (
            r#"{"type": "exact_match", "max_new_tokens": 4}"#,
            "exact_match",
        ),
        (r#"{"type": "reward"}"#, "reward"),
    ];
    for (json, name) in kinds {
        let kind: ObjectiveKind = serde_json::from_str(json).unwrap();
        assert_eq!(kind.build().unwrap().name(), name);
    }
    let err = ObjectiveKind::ExactMatch { max_new_tokens: 0 }
        .build()
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "`max_new_tokens` must be at least 1 (given 0)"
    );
}

#[test]
fn trainer_config_deserializes_with_defaults_for_missing_fields() {
    let config: TrainerConfig = serde_json::from_str(
        r#"{"lr": 0.0005, "lr_schedule": {"type": "linear", "final_fraction": 0}}"#,
    )
    .unwrap();
    assert_eq!(
        config,
        TrainerConfig {
            lr: 5e-4,
            lr_schedule: LrSchedule::Linear {
                final_fraction: 0.0
            },
            ..TrainerConfig::default()
        }
    );
}
