//! MeZO on the real model, end to end through the engine: a short `completion` run lowers the
//! loss on its examples, the non-differentiable `f1` objective runs greedy decoding under θ±εz
//! and sees a non-zero projected gradient at ε = 0.1, and `mezo bench mezo` and `mezo bench
//! feedback` run on a tiny data file and print their tables.

mod common;

use std::process::Command;

use adapters::{LoraAdapter, LoraConfig};
use mezo_server::datasets::sentiment::SentimentTask;
use mezo_server::engine::loaded_model::LoadedModel;
use mezo_server::engine::weights::WeightMode;
use plugin::{Estimator, ObjectiveKind, Trainer, TrainerConfig, TrainingExample};

fn model() -> LoadedModel {
    // The default weight mode: quantized storage, f32 numerics in every product.
    LoadedModel::load(&common::model_path(), WeightMode::default()).expect("load")
}

fn fresh_adapter(model: &LoadedModel) -> LoraAdapter {
    LoraAdapter::new_initialized(LoraConfig::default(), model.transformer.config.dims(), 0)
        .expect("adapter")
}

#[test]
fn thirty_completion_steps_lower_the_loss_on_their_examples() {
    let model = model();
    let examples = common::green_answers();
    // The defaults (FZOO, four directions, lr 5e-3 decaying to 0) on a batch of the four.
    let config = TrainerConfig {
        batch_size: 4,
        max_steps: 30,
        seed: 1,
        ..TrainerConfig::default()
    };
    let objective = ObjectiveKind::Completion.build().expect("objective");
    let mut trainer = Trainer::new(
        config,
        objective,
        fresh_adapter(&model),
        examples.clone(),
        Vec::new(),
    )
    .expect("trainer");
    let refs: Vec<&TrainingExample> = examples.iter().collect();
    let before = trainer
        .objective()
        .evaluate(&model, trainer.adapter(), &refs)
        .expect("evaluate")
        .loss;
    for _ in 0..30 {
        trainer.step(&model).expect("step");
    }
    let after = trainer
        .objective()
        .evaluate(&model, trainer.adapter(), &refs)
        .expect("evaluate")
        .loss;
    assert!(
        after < before,
        "30 steps of the defaults should lower the completion loss: {before} -> {after}"
    );
    // Replaying the step log reproduces the trained adapter bit for bit.
    let replayed = plugin::replay(&fresh_adapter(&model), trainer.log()).expect("replay");
    assert_eq!(&replayed, trainer.adapter());
}

#[test]
fn f1_objective_decodes_under_both_perturbations_and_moves() {
    let model = model();
    // Open-ended answers of 24 tokens: a perturbation of ε = 0.1 rarely changes a short factual
    // answer, but it changes some token of a longer one within a few steps.
    let examples: Vec<TrainingExample> = [
        ("<|im_start|>user\nDescribe the sea in one sentence.<|im_end|>\n<|im_start|>assistant\n", "The sea is deep, blue and full of life."),
        ("<|im_start|>user\nDescribe a forest in one sentence.<|im_end|>\n<|im_start|>assistant\n", "A forest is a quiet place of tall green trees."),
    ]
    .iter()
    .map(|(prompt, answer)| TrainingExample::Generation {
        prompt: prompt.to_string(),
        references: vec![answer.to_string()],
    })
    .collect();
    // MeZO's step: one direction, decoded under θ+εz and θ−εz.
    let config = TrainerConfig {
        estimator: Estimator::Central,
        n_perturbations: 1,
        lr: 1e-3,
        epsilon: 1e-1,
        batch_size: 2,
        max_steps: 6,
        seed: 3,
        ..TrainerConfig::default()
    };
    let objective = ObjectiveKind::TokenF1 { max_new_tokens: 24 }
        .build()
        .expect("objective");
    let mut trainer = Trainer::new(
        config,
        objective,
        fresh_adapter(&model),
        examples,
        Vec::new(),
    )
    .expect("trainer");
    let grads: Vec<f32> = (0..6)
        .map(|_| trainer.step(&model).expect("step").projected_grads[0])
        .collect();
    assert!(
        grads.iter().any(|g| *g != 0.0),
        "ε = 0.1 should change some greedy answer within 6 steps: {grads:?}"
    );
}

/// A data folder holding a movie-review file of 12 short reviews, 6 of each label.
fn tiny_reviews() -> tempfile::TempDir {
    let data = tempfile::tempdir().expect("a data folder");
    let reviews = [
        ("A warm, funny and moving film.", 3.1),
        ("Dull, slow and far too long.", -2.6),
        ("The best thing I have seen all year.", 3.4),
        ("A tedious mess.", -3.0),
        ("Brilliant acting and a clever script.", 2.9),
        ("I walked out halfway through.", -2.2),
        ("Charming and beautifully shot.", 2.5),
        ("Boring from the first minute.", -2.8),
        ("Gripping and full of heart.", 3.0),
        ("The worst film of the decade.", -3.5),
        ("A delightful surprise.", 2.7),
        ("Lifeless and predictable.", -2.4),
    ];
    let text: String = reviews
        .iter()
        .enumerate()
        .map(|(i, (review, rating))| format!("{i}\t{rating}\t{review}\r\n"))
        .collect();
    std::fs::write(
        data.path().join(SentimentTask::MovieReviews.file_name()),
        text,
    )
    .expect("write the data");
    data
}

#[test]
fn the_mezo_benchmark_prints_its_table_and_writes_its_curves() {
    let data = tiny_reviews();
    let plot = data.path().join("curves.png");
    let run = |options: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_mezo"))
            .arg("--model")
            .arg(common::model_path())
            .arg("--data-dir")
            .arg(data.path())
            .args(["bench", "mezo", "--steps", "2", "--eval-every", "1"])
            .args(["--train-size", "8", "--test-size", "4", "--batch-size", "4"])
            .args(["--lr", "2e-3", "--lr-final-fraction", "0", "--plot"])
            .arg(&plot)
            .args(options)
            .output()
            .expect("run mezo bench mezo");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{stdout}\n{stderr}");
        (stdout, stderr)
    };
    let fzoo = run(&["--n-perturbations", "3"]);
    let expected =
        "FZOO estimator, optimizer {\"type\":\"sgd\"}; 3 direction(s) per step (4 evaluations";
    assert!(
        fzoo.0.contains(expected),
        "missing {expected:?} in\n{}",
        fzoo.0
    );
    let (stdout, stderr) = run(&[
        "--optimizer",
        r#"{"type":"momentum","beta":0.8}"#,
        "--trained-tensors",
        "lora-b",
        "--n-perturbations",
        "2",
        "--split-batch",
        "true",
        "--estimator",
        "central",
    ]);
    for expected in [
        "8 train / 4 held-out",
        "lr 0.002 (linear to 0 of it at the last step)",
        "B only trained; central-difference estimator, optimizer {\"type\":\"momentum\",\"beta\":0.8}",
        "2 direction(s) per step, each on its share of the batch (2 evaluations of the batch)",
        "| zero-shot held-out accuracy |",
        "| held-out accuracy after 2 steps |",
        "| step / forward |",
        "| training / serving peak RSS |",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in\n{stdout}"
        );
    }
    assert!(stderr.contains("held-out after     2 steps"), "{stderr}");
    let png = std::fs::read(&plot).expect("the curves PNG");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
}

#[test]
fn the_feedback_benchmark_rates_answers_and_serves_each_new_version() {
    let data = tiny_reviews();
    let output = Command::new(env!("CARGO_BIN_EXE_mezo"))
        .arg("--model")
        .arg(common::model_path())
        .arg("--data-dir")
        .arg(data.path())
        .args(["bench", "feedback", "--items", "6", "--feedback-every", "3"])
        .args([
            "--steps",
            "1",
            "--window",
            "3",
            "--probe",
            "2",
            "--max-tokens",
            "4",
        ])
        .args(["--correction-rate", "1"])
        .output()
        .expect("run mezo bench feedback");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for expected in [
        "| requests | right answers | named a label | corrections sent | served by |",
        "| 1–3 |",
        // Each job finishes before the next request: the second window meets its version.
        "| feedback-bench@1 |",
        "2 jobs, 2 steps",
        "reviews nobody rated (2): base model",
        "feedback-bench@2",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in\n{stdout}\n{stderr}"
        );
    }
}

#[test]
fn the_peer_comparison_asks_for_the_papers_step() {
    let output = Command::new(env!("CARGO_BIN_EXE_mezo"))
        .arg("--model")
        .arg(common::model_path())
        .args(["bench", "mezo", "--peer", "/nonexistent/python"])
        .output()
        .expect("run mezo bench mezo");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("run the same step here with --estimator central --n-perturbations 1"),
        "{stderr}"
    );
}
