//! `mezo bench mezo`: MeZO on the SST-2-like movie-review task (DESIGN.md §3–§4). Prints
//! zero-shot and trained held-out accuracy, time per step against time per forward of a batch
//! of the same size, and peak memory while only serving against while training; writes a PNG of
//! the train loss and held-out accuracy curves.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use adapters::{LoraAdapter, LoraConfig};
use plugin::{
    LrSchedule, ObjectiveKind, ScoreRequest, Trainer, TrainerConfig, TrainerEvent, TrainingExample,
    ZoEngine,
};

use super::plot::{write_png, Panel, Series};
use crate::datasets::movie_reviews::{self, Review, CANDIDATES};
use crate::engine::loaded_model::LoadedModel;
use crate::engine::weights::WeightMode;
use crate::process_memory;

/// What the run is asked to do.
#[derive(Debug, Clone)]
pub struct MezoBenchConfig {
    pub model: PathBuf,
    pub weights: WeightMode,
    pub data_dir: PathBuf,
    pub train_size: usize,
    pub test_size: usize,
    pub steps: u64,
    pub eval_every: u64,
    pub lr: f32,
    pub lr_schedule: LrSchedule,
    pub epsilon: f32,
    pub batch_size: usize,
    pub seed: u64,
    pub plot: PathBuf,
}

fn to_example(review: &Review) -> TrainingExample {
    TrainingExample::Classification {
        prompt: review.prompt(),
        candidates: CANDIDATES.iter().map(|c| c.to_string()).collect(),
        label: review.label(),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Batches timed for the forward reference: steps draw random batches whose token counts vary,
/// so one batch alone can be a tenth shorter or longer than a typical one.
const TIMED_BATCHES: usize = 5;

/// Seconds for one forward of a batch under one adapter: the median over the first
/// [`TIMED_BATCHES`] batches of the training set, each the faster of two runs.
fn forward_seconds(
    model: &LoadedModel,
    adapter: &LoraAdapter,
    train: &[Review],
    batch_size: usize,
) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for batch in train.chunks(batch_size.max(1)).take(TIMED_BATCHES) {
        let items: Vec<ScoreRequest> = batch
            .iter()
            .map(|r| ScoreRequest {
                prompt: model.tokenize(&r.prompt(), true),
                continuations: CANDIDATES
                    .iter()
                    .map(|c| model.tokenize(c, false))
                    .collect(),
            })
            .collect();
        let mut best = f64::INFINITY;
        for _ in 0..2 {
            let start = Instant::now();
            model.score(&[adapter], &items)?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        times.push(best);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

pub fn run(config: &MezoBenchConfig) -> anyhow::Result<()> {
    let reviews = movie_reviews::load(&config.data_dir, &mut std::io::stderr())?;
    let (train, test) =
        movie_reviews::split(reviews, config.seed, config.train_size, config.test_size);
    let model = LoadedModel::load(&config.model, config.weights)?;
    let initial = LoraAdapter::new_initialized(
        LoraConfig::default(),
        model.llama.config.dims(),
        config.seed,
    )?;
    let trainer_config = TrainerConfig {
        lr: config.lr,
        lr_schedule: config.lr_schedule,
        epsilon: config.epsilon,
        batch_size: config.batch_size,
        max_steps: config.steps,
        eval_every: config.eval_every,
        seed: config.seed,
        ..TrainerConfig::default()
    };
    let mut trainer = Trainer::new(
        trainer_config,
        ObjectiveKind::Classification.build()?,
        initial.clone(),
        train.iter().map(to_example).collect(),
        test.iter().map(to_example).collect(),
    )?;

    eprintln!(
        "timing one forward of {}-example batches …",
        config.batch_size
    );
    let forward = forward_seconds(&model, &initial, &train, config.batch_size)?;
    let mut losses = Vec::new();
    let mut accuracy = Vec::new();
    let mut step_seconds = Vec::new();
    let mut serving_peak = None;
    let mut last = Instant::now();
    eprintln!(
        "training {} steps of {} (held-out: {} examples every {} steps) …",
        config.steps,
        config.batch_size,
        test.len(),
        config.eval_every
    );
    trainer.run(&model, |event| {
        match event {
            TrainerEvent::Step(record) => {
                step_seconds.push(last.elapsed().as_secs_f64());
                losses.push((record.step as f64, f64::from(record.train_loss())));
                if record.step % 10 == 0 {
                    eprintln!(
                        "step {:>5}  loss {:.4}  g {:+.3}",
                        record.step,
                        record.train_loss(),
                        record.projected_grads[0]
                    );
                }
            }
            TrainerEvent::HeldOut(report) => {
                let acc = report
                    .evaluation
                    .metrics
                    .get("accuracy")
                    .copied()
                    .unwrap_or(f64::NAN);
                // The first held-out evaluation is zero-shot: only serving-like work so far.
                serving_peak.get_or_insert_with(process_memory::peak_resident_bytes);
                eprintln!(
                    "held-out after {:>5} steps: accuracy {:.2}%",
                    report.steps_done,
                    acc * 100.0
                );
                accuracy.push((report.steps_done as f64, acc));
            }
        }
        last = Instant::now();
        ControlFlow::Continue(())
    })?;
    let training_peak = process_memory::peak_resident_bytes().unwrap_or(0);
    let serving_peak = serving_peak.flatten().unwrap_or(0);

    write_png(
        &config.plot,
        &[
            Panel {
                series: vec![Series {
                    points: losses.clone(),
                    rgb: [200, 40, 40],
                }],
            },
            Panel {
                series: vec![Series {
                    points: accuracy.clone(),
                    rgb: [40, 80, 200],
                }],
            },
        ],
    )?;

    // Held-out evaluations interleave with steps; they are not part of step time.
    step_seconds.sort_by(f64::total_cmp);
    let step = step_seconds
        .get(step_seconds.len() / 2)
        .copied()
        .unwrap_or(f64::NAN);
    let zero_shot = accuracy.first().map_or(f64::NAN, |a| a.1);
    let trained = accuracy.last().map_or(f64::NAN, |a| a.1);
    println!("machine: {}", super::engine::machine_description());
    println!(
        "task: movie-review sentiment, {} train / {} held-out, prompt {:?}, candidates {:?}",
        train.len(),
        test.len(),
        movie_reviews::PROMPT_TEMPLATE,
        CANDIDATES
    );
    let schedule = match config.lr_schedule {
        LrSchedule::Constant => "constant".to_string(),
        LrSchedule::Linear { final_fraction } => {
            format!("linear to {final_fraction} of it at the last step")
        }
    };
    println!(
        "MeZO: LoRA r=8 α=16 on q,v; lr {} ({schedule}) ε {} batch {} seed {}; weights {}",
        config.lr, config.epsilon, config.batch_size, config.seed, config.weights
    );
    println!("| measure | value |\n|---|---|");
    println!(
        "| zero-shot held-out accuracy | {:.2}% |",
        zero_shot * 100.0
    );
    println!(
        "| held-out accuracy after {} steps | {:.2}% ({:+.2} points) |",
        trainer.steps_done(),
        trained * 100.0,
        (trained - zero_shot) * 100.0
    );
    println!("| time per MeZO step (median) | {step:.3} s |");
    println!("| time per forward of a batch (median of {TIMED_BATCHES}) | {forward:.3} s |");
    println!("| step / forward | {:.2} |", step / forward);
    println!(
        "| peak RSS, serving only (forward + zero-shot eval) | {:.0} MiB |",
        mib(serving_peak)
    );
    println!("| peak RSS, training | {:.0} MiB |", mib(training_peak));
    println!(
        "| training / serving peak RSS | {:.3} |",
        training_peak as f64 / serving_peak.max(1) as f64
    );
    println!(
        "curves (top: train loss per step, bottom: held-out accuracy): {}",
        config.plot.display()
    );
    Ok(())
}

/// Default location of the curves PNG.
pub fn default_plot_path(data_dir: &Path) -> PathBuf {
    data_dir.join("mezo_sentiment_curves.png")
}
