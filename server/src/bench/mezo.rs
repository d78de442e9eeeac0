//! `mezo bench mezo`: MeZO on a sentiment task of [`crate::datasets::sentiment`], by default
//! the SST-2-like movie reviews (`--task nyt-editorials` for the second task). Prints
//! zero-shot and trained held-out accuracy, time per step against time per forward of a batch
//! of the same size, and peak memory while only serving against while training; writes a PNG of
//! the train loss and held-out accuracy curves. With `--top-layers N` the adapter covers the top
//! N layers only and training reuses the frozen layers' hidden states
//! ([`crate::engine::frozen_layers`]).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use adapters::{LoraAdapter, LoraConfig};
use plugin::{
    Estimator, LrSchedule, ObjectiveKind, ScoreRequest, TrainedTensors, Trainer, TrainerConfig,
    TrainerEvent, TrainingExample, ZoEngine,
};

use super::peers;
use crate::datasets::sentiment::{self, SentimentTask, Snippet, CANDIDATES};
use crate::engine::frozen_layers::FrozenStatesBudget;
use crate::engine::loaded_model::LoadedModel;
use crate::engine::weights::WeightMode;
use crate::engine::zo_backend::ReusingEngine;
use crate::learning_curves::png::write_png;
use crate::learning_curves::{render_svg, Chart, Line, PALETTE};
use crate::process_memory;
use crate::progress::Progress;

/// What the run is asked to do.
#[derive(Debug, Clone)]
pub struct MezoBenchConfig {
    pub task: SentimentTask,
    pub model: PathBuf,
    pub weights: WeightMode,
    pub data_dir: PathBuf,
    pub train_size: usize,
    pub test_size: usize,
    /// The run: its length, held-out cadence, seed (also of the split and the adapter's
    /// initialisation), optimizer and the rest.
    pub trainer: TrainerConfig,
    /// Adapt only this many top layers; `None` adapts every layer.
    pub top_layers: Option<usize>,
    /// Memory for the hidden states kept below the adapted layers.
    pub frozen_states_bytes: usize,
    /// A Python with PyTorch, transformers and peft: the paper's reference step runs on the same
    /// batches after ours, and both are printed.
    pub peer: Option<PathBuf>,
    /// Steps the reference runs (its median is printed).
    pub peer_steps: usize,
    pub plot: PathBuf,
}

/// The adapted layers of a model with `n_layer` layers when only the top `top` are.
fn top_layers(n_layer: usize, top: Option<usize>) -> anyhow::Result<Option<Vec<usize>>> {
    match top {
        None => Ok(None),
        Some(top) if (1..=n_layer).contains(&top) => Ok(Some((n_layer - top..n_layer).collect())),
        Some(top) => anyhow::bail!(
            "--top-layers {top}: the model has {n_layer} layers; give a number from 1 to {n_layer}"
        ),
    }
}

fn to_example(review: &Snippet) -> TrainingExample {
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

/// The first [`TIMED_BATCHES`] batches of the training set, tokenized as training sees them.
fn timed_batches(
    model: &LoadedModel,
    train: &[Snippet],
    batch_size: usize,
) -> Vec<Vec<ScoreRequest>> {
    train
        .chunks(batch_size.max(1))
        .take(TIMED_BATCHES)
        .map(|batch| {
            batch
                .iter()
                .map(|r| ScoreRequest {
                    prompt: model.tokenize(&r.prompt(), true),
                    continuations: CANDIDATES
                        .iter()
                        .map(|c| model.tokenize(c, false))
                        .collect(),
                })
                .collect()
        })
        .collect()
}

/// Seconds for one full forward of a batch under one adapter: the median over `batches`, each
/// the faster of two runs.
fn forward_seconds(
    model: &LoadedModel,
    adapter: &LoraAdapter,
    batches: &[Vec<ScoreRequest>],
) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for items in batches {
        let mut best = f64::INFINITY;
        for _ in 0..2 {
            let start = Instant::now();
            model.score(&[adapter], items)?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        times.push(best);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Runs the paper's reference step on the same batches (see [`peers`]).
fn run_reference(
    python: &Path,
    config: &MezoBenchConfig,
    batches: &[Vec<ScoreRequest>],
    labels: &[Vec<usize>],
) -> anyhow::Result<peers::MezoReference> {
    let batches: Vec<Vec<serde_json::Value>> = batches
        .iter()
        .zip(labels)
        .map(|(items, labels)| {
            items
                .iter()
                .zip(labels)
                .map(|(item, label)| {
                    serde_json::json!({
                        "prompt": item.prompt,
                        "candidates": item.continuations,
                        "label": label,
                    })
                })
                .collect()
        })
        .collect();
    let input = serde_json::json!({
        "model": config.model,
        "threads": peers::threads(),
        "epsilon": config.trainer.epsilon,
        "lr": config.trainer.lr,
        "seed": config.trainer.seed,
        "steps": config.peer_steps,
        "batches": batches,
    });
    peers::run(python, &peers::MEZO_REFERENCE, &input)
}

pub fn run(config: &MezoBenchConfig) -> anyhow::Result<()> {
    let mezo_step =
        config.trainer.estimator == Estimator::Central && config.trainer.n_perturbations == 1;
    if config.peer.is_some() && !mezo_step {
        anyhow::bail!(
            "--peer times the MeZO paper's step (one central direction) beside ours; run the \
             same step here with --estimator central --n-perturbations 1"
        );
    }
    let reviews = sentiment::load(config.task, &config.data_dir, &mut std::io::stderr())?;
    let (train, test) = sentiment::split(
        reviews,
        config.trainer.seed,
        config.train_size,
        config.test_size,
    );
    let model = LoadedModel::load(&config.model, config.weights)?;
    let n_layer = model.transformer.config.n_layer;
    let lora = LoraConfig {
        layers: top_layers(n_layer, config.top_layers)?,
        ..LoraConfig::default()
    };
    let initial =
        LoraAdapter::new_initialized(lora, model.transformer.config.dims(), config.trainer.seed)?;
    let engine = ReusingEngine::new(&model, FrozenStatesBudget::new(config.frozen_states_bytes));
    let mut trainer = Trainer::new(
        config.trainer.clone(),
        ObjectiveKind::Classification.build()?,
        initial.clone(),
        train.iter().map(to_example).collect(),
        test.iter().map(to_example).collect(),
    )?;

    eprintln!(
        "timing one forward of {}-example batches …",
        config.trainer.batch_size
    );
    let batches = timed_batches(&model, &train, config.trainer.batch_size);
    let forward = forward_seconds(&model, &initial, &batches)?;
    let mut losses = Vec::new();
    let mut accuracy = Vec::new();
    let mut step_seconds = Vec::new();
    let mut serving_peak = None;
    let mut last = Instant::now();
    eprintln!(
        "training {} steps of {} (held-out: {} examples every {} steps) …",
        config.trainer.max_steps,
        config.trainer.batch_size,
        test.len(),
        config.trainer.eval_every
    );
    let progress = Progress::steps(config.trainer.max_steps, "steps", "training");
    trainer.run(&engine, |event| {
        match event {
            TrainerEvent::Step(record) => {
                step_seconds.push(last.elapsed().as_secs_f64());
                losses.push((record.step as f64, f64::from(record.train_loss())));
                progress.set_position(record.step);
                progress.set_message(format!("training, loss {:.4}", record.train_loss()));
                if record.step % 10 == 0 {
                    progress.println(format!(
                        "step {:>5}  loss {:.4}  g {:+.3}",
                        record.step,
                        record.train_loss(),
                        record.projected_grads[0]
                    ));
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
                progress.println(format!(
                    "held-out after {:>5} steps: accuracy {:.2}%",
                    report.steps_done,
                    acc * 100.0
                ));
                accuracy.push((report.steps_done as f64, acc));
            }
        }
        last = Instant::now();
        ControlFlow::Continue(())
    })?;
    drop(progress);
    let training_peak = process_memory::peak_resident_bytes().unwrap_or(0);
    let kept_bytes = engine.frozen_states_bytes();
    let serving_peak = serving_peak.flatten().unwrap_or(0);

    let task_name = format!("{:?}", config.task);
    let charts = [
        Chart {
            title: format!("MeZO on {task_name}: training loss"),
            x_label: "step".into(),
            y_label: "loss".into(),
            lines: vec![Line {
                name: "train loss (the step's minibatch)".into(),
                color: PALETTE[0],
                points: losses.clone(),
            }],
        },
        Chart {
            title: format!("MeZO on {task_name}: held-out accuracy"),
            x_label: "step".into(),
            y_label: "accuracy".into(),
            lines: vec![Line {
                name: format!("held-out accuracy ({} examples)", test.len()),
                color: PALETTE[1],
                points: accuracy.clone(),
            }],
        },
    ];
    write_png(&config.plot, &charts)?;
    let svg_path = config.plot.with_extension("svg");
    std::fs::write(&svg_path, render_svg(&charts))?;

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
        "task: {}, {} train / {} held-out, prompt {:?}, candidates {:?}",
        config.task.description(),
        train.len(),
        test.len(),
        config.task.prompt_template(),
        CANDIDATES
    );
    let schedule = match config.trainer.lr_schedule {
        LrSchedule::Constant => "constant".to_string(),
        LrSchedule::Linear { final_fraction } => {
            format!("linear to {final_fraction} of it at the last step")
        }
    };
    let layers = match config.top_layers {
        None => format!("all {n_layer} layers"),
        Some(top) => format!("the top {top} of {n_layer} layers"),
    };
    println!(
        "MeZO: LoRA r=8 α=16 on q,v of {layers}, {} trained; {} estimator, optimizer {}; {} \
         direction(s) per step{} ({} evaluations of the batch); lr {} ({schedule}) ε {} batch {} \
         seed {}; weights {}; kernels {}",
        match config.trainer.trained_tensors {
            TrainedTensors::All => "A and B",
            TrainedTensors::LoraB => "B only",
        },
        match config.trainer.estimator {
            Estimator::Central => "central-difference",
            Estimator::Fzoo => "FZOO",
        },
        serde_json::to_string(&config.trainer.optimizer)?,
        config.trainer.n_perturbations,
        if config.trainer.split_batch {
            ", each on its share of the batch"
        } else {
            ""
        },
        config
            .trainer
            .estimator
            .evaluations(config.trainer.n_perturbations, config.trainer.split_batch),
        config.trainer.lr,
        config.trainer.epsilon,
        config.trainer.batch_size,
        config.trainer.seed,
        config.weights,
        crate::engine::kernels::isa::Isa::selected().name()
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
    println!("| time per full forward of a batch (median of {TIMED_BATCHES}) | {forward:.3} s |");
    println!("| step / forward | {:.2} |", step / forward);
    println!(
        "| peak RSS, serving only (forward + zero-shot eval) | {:.0} MiB |",
        mib(serving_peak)
    );
    println!("| peak RSS, training | {:.0} MiB |", mib(training_peak));
    println!(
        "| hidden states kept below the adapted layers | {:.0} MiB |",
        mib(kept_bytes as u64)
    );
    println!(
        "| training / serving peak RSS | {:.3} |",
        training_peak as f64 / serving_peak.max(1) as f64
    );
    println!(
        "curves (top: train loss per step, bottom: held-out accuracy): {} and {}",
        config.plot.display(),
        svg_path.display()
    );
    if let Some(python) = &config.peer {
        let labels: Vec<Vec<usize>> = train
            .chunks(config.trainer.batch_size.max(1))
            .take(batches.len())
            .map(|batch| batch.iter().map(Snippet::label).collect())
            .collect();
        let reference = run_reference(python, config, &batches, &labels)?;
        println!(
            "reference: the MeZO paper's step in PyTorch + transformers + peft ({}), f32, {} \
             threads, {} steps on the same batches",
            reference.versions, reference.threads, config.peer_steps
        );
        println!(
            "| measure | mezo-serve | reference | reference / mezo-serve |\n|---|---|---|---|"
        );
        println!(
            "| time per MeZO step (median) | {step:.3} s | {:.3} s | {:.2}× |",
            reference.step_seconds,
            peers::speedup(step, reference.step_seconds)
        );
        println!(
            "| time per full forward of a batch (median of {TIMED_BATCHES}) | {forward:.3} s | \
             {:.3} s | {:.2}× |",
            reference.forward_seconds,
            peers::speedup(forward, reference.forward_seconds)
        );
        println!(
            "| peak RSS, training | {:.0} MiB | {:.0} MiB | {:.2}× |",
            mib(training_peak),
            mib(reference.peak_rss_bytes),
            reference.peak_rss_bytes as f64 / training_peak.max(1) as f64
        );
    }
    Ok(())
}

/// Default location of the curves PNG.
pub fn default_plot_path(data_dir: &Path) -> PathBuf {
    data_dir.join("mezo_sentiment_curves.png")
}
