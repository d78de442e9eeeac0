//! The trainer: a MeZO run over a dataset, one step at a time.
//!
//! A [`Trainer`] owns θ, the examples and the step log; it borrows the engine for each call, so a
//! server can interleave training steps with serving and stop between any two steps. Everything
//! a step uses is a function of the run's seed and the step's index: the minibatch (a seeded
//! shuffle per epoch, sampled without replacement; the last partial batch of an epoch is dropped
//! so that every step sees `batch_size` examples) and the perturbation seeds. So a run resumed
//! from its step log ([`Trainer::resume`]) continues exactly as if it had never stopped.
//!
//! With held-out examples, the trainer grades θ every `eval_every` steps (and before the first),
//! keeps the best adapter seen, and stops early after `early_stopping_patience` evaluations
//! without a lower held-out loss.

use std::ops::ControlFlow;

use adapters::LoraAdapter;
use rand::seq::SliceRandom;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::objectives::wrong_kind;
use crate::spsa::examples_per_direction;
use crate::{
    DynEngine, Estimator, EvalMode, Evaluation, Objective, Optimizer, OptimizerState, Result,
    SpsaStep, StepRecord, TrainError, TrainedTensors, TrainingExample,
};

/// Hyperparameters of a run. The defaults are the best configuration measured on the movie
/// reviews (README, "Learning"): LoRA's A and B trained by ZO-SGD on FZOO's estimate from four
/// directions per step, lr 5e-3 decaying linearly to 0 over 300 steps, ε 1e-3, batch 16, no
/// weight decay. Every API
/// of the server and `mezo bench mezo` start from them; change them here only with a measurement
/// that beats them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainerConfig {
    /// Peak learning rate, > 0.
    pub lr: f32,
    pub lr_schedule: LrSchedule,
    /// Perturbation scale ε, > 0. Non-differentiable objectives need larger values (up to 1e-1)
    /// for a perturbation to change a prediction at all.
    pub epsilon: f32,
    /// Examples per step, at least 1 and at most the number of training examples.
    pub batch_size: usize,
    /// Decoupled weight decay, ≥ 0, applied at each step as `lr·wd·θ`.
    pub weight_decay: f32,
    /// Perturbations averaged per step (n-SPSA's q, FZOO's N), at least 1; each costs two
    /// evaluations of the batch (of its q-th with `split_batch`), or one with FZOO (plus one for
    /// the baseline).
    pub n_perturbations: usize,
    /// Each perturbation is evaluated on its own `batch_size / n_perturbations` examples of the
    /// step's batch (P-RGE): q directions for the forwards of one. `batch_size` must then be a
    /// multiple of `n_perturbations`.
    pub split_batch: bool,
    /// When set, each projected gradient is clipped to `[−max, max]`; > 0.
    pub max_projected_grad: Option<f32>,
    pub eval_mode: EvalMode,
    /// How the losses become projected gradients ([`crate::spsa`]): central differences, or FZOO's
    /// normalised one-sided differences.
    pub estimator: Estimator,
    /// How the estimate becomes an update ([`crate::optimizer`]).
    pub optimizer: Optimizer,
    /// The adapter tensors perturbed and updated.
    pub trained_tensors: TrainedTensors,
    /// Length of the run, in steps; at least 1.
    pub max_steps: u64,
    /// Seed of the run: minibatches and perturbations follow from it.
    pub seed: u64,
    /// Steps between held-out evaluations (when there are held-out examples), at least 1.
    pub eval_every: u64,
    /// Evaluations without improvement of the held-out loss after which the run stops; unset:
    /// run `max_steps`. Needs held-out examples.
    pub early_stopping_patience: Option<u32>,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            // FZOO's estimate is normalised (each g of order 1), so the rate sets the step's size;
            // decaying it to 0 keeps the late steps from undoing the early ones (a constant 3e-3
            // diverged after ~100 steps with the central estimator).
            lr: 5e-3,
            lr_schedule: LrSchedule::Linear {
                final_fraction: 0.0,
            },
            epsilon: 1e-3,
            batch_size: 16,
            weight_decay: 0.0,
            n_perturbations: 4,
            split_batch: false,
            max_projected_grad: None,
            eval_mode: EvalMode::OneForward,
            estimator: Estimator::Fzoo,
            optimizer: Optimizer::Sgd,
            trained_tensors: TrainedTensors::All,
            max_steps: 300,
            seed: 0,
            eval_every: 50,
            early_stopping_patience: None,
        }
    }
}

impl TrainerConfig {
    /// Checks every hyperparameter on its own (the batch size against the data is checked by
    /// [`Trainer::new`]).
    pub fn validate(&self) -> Result<()> {
        positive("lr", self.lr)?;
        positive("epsilon", self.epsilon)?;
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(TrainError::config(
                "weight_decay",
                "a finite number ≥ 0",
                self.weight_decay,
            ));
        }
        if let Some(max) = self.max_projected_grad {
            positive("max_projected_grad", max)?;
        }
        self.optimizer.validate()?;
        let at_least_one = [
            ("batch_size", self.batch_size as u64),
            ("n_perturbations", self.n_perturbations as u64),
            ("max_steps", self.max_steps),
            ("eval_every", self.eval_every),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return Err(TrainError::config(field, "at least 1", 0));
            }
        }
        examples_per_direction(
            self.estimator,
            self.split_batch,
            self.batch_size,
            self.n_perturbations,
        )?;
        if self.early_stopping_patience == Some(0) {
            return Err(TrainError::config(
                "early_stopping_patience",
                "at least 1 when set",
                0,
            ));
        }
        if let LrSchedule::Linear { final_fraction } = self.lr_schedule {
            if !(0.0..=1.0).contains(&final_fraction) {
                return Err(TrainError::config(
                    "lr_schedule.final_fraction",
                    "in [0, 1]",
                    final_fraction,
                ));
            }
        }
        Ok(())
    }
}

fn positive(field: &'static str, value: f32) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        return Err(TrainError::config(field, "a finite number > 0", value));
    }
    Ok(())
}

/// How the learning rate moves over the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LrSchedule {
    /// `lr` at every step (the MeZO paper's choice).
    #[default]
    Constant,
    /// From `lr` at step 0 down linearly towards `final_fraction · lr` at step `max_steps`.
    Linear { final_fraction: f32 },
}

impl LrSchedule {
    /// The learning rate of step `step` (0-based) of a run of `total_steps`.
    pub fn lr_at(self, lr: f32, step: u64, total_steps: u64) -> f32 {
        match self {
            LrSchedule::Constant => lr,
            LrSchedule::Linear { final_fraction } => {
                let progress = step as f64 / total_steps.max(1) as f64;
                let factor = 1.0 - (1.0 - f64::from(final_fraction)) * progress;
                (f64::from(lr) * factor) as f32
            }
        }
    }
}

/// The best adapter the held-out evaluations have seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Steps done when it was evaluated (0: the initial adapter).
    pub steps_done: u64,
    pub evaluation: Evaluation,
    pub adapter: LoraAdapter,
}

/// A held-out evaluation, as reported to the caller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldOutReport {
    /// Steps done when θ was evaluated.
    pub steps_done: u64,
    pub evaluation: Evaluation,
    /// Whether this is the lowest held-out loss so far (the first evaluation always is).
    pub improved: bool,
}

/// What [`Trainer::run`] reports as it goes.
#[derive(Debug, Clone, Copy)]
pub enum TrainerEvent<'a> {
    Step(&'a StepRecord),
    HeldOut(&'a HeldOutReport),
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    MaxSteps,
    EarlyStopped,
    /// The caller's callback asked to stop.
    Cancelled,
}

/// A MeZO run: θ, its data, its step log, and the held-out bookkeeping.
pub struct Trainer {
    config: TrainerConfig,
    objective: Box<dyn Objective>,
    train: Vec<TrainingExample>,
    held_out: Vec<TrainingExample>,
    theta: LoraAdapter,
    /// The optimizer's moments: like θ, a function of the log.
    state: OptimizerState,
    log: Vec<StepRecord>,
    best: Option<Checkpoint>,
    evaluations_without_improvement: u32,
    /// Steps done at the last held-out evaluation, so that [`Self::run`] does not grade the same
    /// θ twice (which early stopping would count as an evaluation without improvement).
    held_out_evaluated_at: Option<u64>,
}

impl Trainer {
    /// A run from `initial`, once the configuration and every example are checked.
    pub fn new(
        config: TrainerConfig,
        objective: Box<dyn Objective>,
        initial: LoraAdapter,
        train: Vec<TrainingExample>,
        held_out: Vec<TrainingExample>,
    ) -> Result<Self> {
        config.validate()?;
        if config.batch_size > train.len() {
            return Err(TrainError::config(
                "batch_size",
                format!("at most the number of training examples, {}", train.len()),
                config.batch_size,
            ));
        }
        if held_out.is_empty() {
            if let Some(patience) = config.early_stopping_patience {
                return Err(TrainError::config(
                    "early_stopping_patience",
                    "unset when no held-out examples are given",
                    patience,
                ));
            }
        }
        check_examples(objective.as_ref(), &train)?;
        check_examples(objective.as_ref(), &held_out)
            .map_err(|e| TrainError::InHeldOutSet(Box::new(e)))?;
        Ok(Self {
            state: OptimizerState::new(config.optimizer, config.trained_tensors),
            config,
            objective,
            train,
            held_out,
            theta: initial,
            log: Vec::new(),
            best: None,
            evaluations_without_improvement: 0,
            held_out_evaluated_at: None,
        })
    }

    /// The run of [`Self::new`] after the steps of `log` (a previous, interrupted run with the same
    /// configuration, data and initial adapter), θ and the optimizer's state replayed bit for bit.
    /// The held-out history is not in the log: the next evaluation starts it afresh.
    pub fn resume(
        config: TrainerConfig,
        objective: Box<dyn Objective>,
        initial: LoraAdapter,
        train: Vec<TrainingExample>,
        held_out: Vec<TrainingExample>,
        log: Vec<StepRecord>,
    ) -> Result<Self> {
        let mut trainer = Self::new(config, objective, initial, train, held_out)?;
        for (index, record) in log.iter().enumerate() {
            if record.step != index as u64 {
                return Err(TrainError::InvalidStepRecord {
                    step: record.step,
                    reason: format!(
                        "found at position {index} of the log; steps must be 0, 1, 2, …"
                    ),
                });
            }
        }
        if log.len() as u64 > trainer.config.max_steps {
            return Err(TrainError::config(
                "max_steps",
                format!("at least the {} steps of the log to resume", log.len()),
                trainer.config.max_steps,
            ));
        }
        for record in &log {
            record.apply(&mut trainer.theta, &mut trainer.state)?;
        }
        trainer.log = log;
        Ok(trainer)
    }

    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    pub fn objective(&self) -> &dyn Objective {
        self.objective.as_ref()
    }

    /// The current θ.
    pub fn adapter(&self) -> &LoraAdapter {
        &self.theta
    }

    /// Every step so far, in order: with the initial adapter, the run's replayable checkpoint.
    pub fn log(&self) -> &[StepRecord] {
        &self.log
    }

    pub fn steps_done(&self) -> u64 {
        self.log.len() as u64
    }

    /// The adapter with the lowest held-out loss so far, if any evaluation ran.
    pub fn best(&self) -> Option<&Checkpoint> {
        self.best.as_ref()
    }

    /// Why the run should not take another step, if it should not.
    pub fn stop_reason(&self) -> Option<StopReason> {
        if self.steps_done() >= self.config.max_steps {
            return Some(StopReason::MaxSteps);
        }
        match self.config.early_stopping_patience {
            Some(patience) if self.evaluations_without_improvement >= patience => {
                Some(StopReason::EarlyStopped)
            }
            _ => None,
        }
    }

    /// One MeZO step on the next minibatch; θ is updated and the record appended to the log.
    pub fn step(&mut self, engine: &dyn DynEngine) -> Result<StepRecord> {
        let step = self.steps_done();
        if step >= self.config.max_steps {
            return Err(TrainError::RunFinished {
                max_steps: self.config.max_steps,
            });
        }
        let batch: Vec<&TrainingExample> = self
            .batch_indices(step)
            .into_iter()
            .map(|i| &self.train[i])
            .collect();
        let spsa = SpsaStep {
            step,
            seeds: self.perturbation_seeds(step),
            epsilon: self.config.epsilon,
            lr: self
                .config
                .lr_schedule
                .lr_at(self.config.lr, step, self.config.max_steps),
            weight_decay: self.config.weight_decay,
            max_projected_grad: self.config.max_projected_grad,
            eval_mode: self.config.eval_mode,
            estimator: self.config.estimator,
            split_batch: self.config.split_batch,
        };
        let record = spsa.run(
            engine,
            self.objective.as_ref(),
            &mut self.theta,
            &mut self.state,
            &batch,
        )?;
        tracing::debug!(
            step,
            train_loss = record.train_loss(),
            lr = record.lr,
            grads = ?record.projected_grads,
            "mezo step"
        );
        self.log.push(record.clone());
        Ok(record)
    }

    /// Grades the current θ on the held-out examples, keeps it if it is the best so far, and
    /// counts evaluations without improvement for early stopping. `None` without held-out
    /// examples.
    pub fn evaluate_held_out(&mut self, engine: &dyn DynEngine) -> Result<Option<HeldOutReport>> {
        if self.held_out.is_empty() {
            return Ok(None);
        }
        let examples: Vec<&TrainingExample> = self.held_out.iter().collect();
        let evaluation = self.objective.evaluate(engine, &self.theta, &examples)?;
        let improved = self
            .best
            .as_ref()
            .is_none_or(|best| evaluation.loss < best.evaluation.loss);
        if improved {
            self.best = Some(Checkpoint {
                steps_done: self.steps_done(),
                evaluation: evaluation.clone(),
                adapter: self.theta.clone(),
            });
            self.evaluations_without_improvement = 0;
        } else {
            self.evaluations_without_improvement += 1;
        }
        self.held_out_evaluated_at = Some(self.steps_done());
        Ok(Some(HeldOutReport {
            steps_done: self.steps_done(),
            evaluation,
            improved,
        }))
    }

    /// Steps until [`Self::stop_reason`] says stop or `on_event` breaks, evaluating the held-out
    /// set before the first step (unless θ was just evaluated) and every `eval_every` steps and
    /// after the last. A cancelled run can be run again and goes on where it stopped.
    pub fn run(
        &mut self,
        engine: &dyn DynEngine,
        mut on_event: impl FnMut(TrainerEvent<'_>) -> ControlFlow<()>,
    ) -> Result<StopReason> {
        if self.held_out_evaluated_at != Some(self.steps_done()) {
            if let Some(report) = self.evaluate_held_out(engine)? {
                if on_event(TrainerEvent::HeldOut(&report)).is_break() {
                    return Ok(StopReason::Cancelled);
                }
            }
        }
        loop {
            if let Some(reason) = self.stop_reason() {
                return Ok(reason);
            }
            let record = self.step(engine)?;
            if on_event(TrainerEvent::Step(&record)).is_break() {
                return Ok(StopReason::Cancelled);
            }
            let done = self.steps_done();
            if done.is_multiple_of(self.config.eval_every) || done == self.config.max_steps {
                if let Some(report) = self.evaluate_held_out(engine)? {
                    if on_event(TrainerEvent::HeldOut(&report)).is_break() {
                        return Ok(StopReason::Cancelled);
                    }
                }
            }
        }
    }

    /// The indices of step `step`'s minibatch: batch `step mod b` of the epoch's shuffled order,
    /// with `b = ⌊n / batch_size⌋` batches per epoch.
    fn batch_indices(&self, step: u64) -> Vec<usize> {
        let batch_size = self.config.batch_size;
        let batches_per_epoch = (self.train.len() / batch_size) as u64;
        let epoch = step / batches_per_epoch;
        let start = (step % batches_per_epoch) as usize * batch_size;
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        order.shuffle(&mut run_generator(
            self.config.seed,
            Purpose::Shuffle,
            epoch,
        ));
        order[start..start + batch_size].to_vec()
    }

    fn perturbation_seeds(&self, step: u64) -> Vec<u64> {
        let mut rng = run_generator(self.config.seed, Purpose::Perturbation, step);
        (0..self.config.n_perturbations)
            .map(|_| rng.next_u64())
            .collect()
    }
}

/// What a run's random numbers are for; each purpose has its own key.
#[derive(Clone, Copy)]
enum Purpose {
    Shuffle = 1,
    Perturbation = 2,
}

/// The generator of the run's random numbers for `purpose` at `index` (epoch or step): counter
/// based, so step k's numbers do not depend on having drawn those of steps 0..k.
fn run_generator(run_seed: u64, purpose: Purpose, index: u64) -> ChaCha20Rng {
    // Odd constant (2^64/φ) times the purpose: distinct keys per purpose for the same run seed.
    let key = run_seed ^ (purpose as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rng = ChaCha20Rng::seed_from_u64(key);
    rng.set_stream(index);
    rng
}

fn check_examples(objective: &dyn Objective, examples: &[TrainingExample]) -> Result<()> {
    for (index, example) in examples.iter().enumerate() {
        if example.kind() != objective.example_kind() {
            return Err(wrong_kind(objective, index, example));
        }
        example.validate(index)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_decays_from_lr_towards_its_final_fraction() {
        let constant = LrSchedule::Constant;
        assert_eq!(constant.lr_at(1e-3, 7, 10), 1e-3);
        let to_zero = LrSchedule::Linear {
            final_fraction: 0.0,
        };
        // lr · (1 − step/total), computed in f64 and rounded once to f32.
        assert_eq!(to_zero.lr_at(1e-3, 0, 10), 1e-3);
        assert_eq!(
            to_zero.lr_at(1e-3, 5, 10),
            (f64::from(1e-3f32) * 0.5) as f32
        );
        assert_eq!(
            to_zero.lr_at(1e-3, 9, 10),
            (f64::from(1e-3f32) * 0.1) as f32
        );
        let to_tenth = LrSchedule::Linear {
            final_fraction: 0.1,
        };
        // 1 − 0.9 · 5/10 = 0.55.
        let lr = to_tenth.lr_at(1.0, 5, 10);
        assert!((lr - 0.55).abs() < 1e-7, "{lr}");
    }

    #[test]
    fn a_trainer_can_move_to_a_background_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Trainer>();
    }

    #[test]
    fn run_generators_are_per_purpose_and_counter_based() {
        let draw = |purpose, index| run_generator(5, purpose, index).next_u64();
        assert_eq!(
            draw(Purpose::Perturbation, 3),
            draw(Purpose::Perturbation, 3)
        );
        assert_ne!(
            draw(Purpose::Perturbation, 3),
            draw(Purpose::Perturbation, 4)
        );
        assert_ne!(draw(Purpose::Perturbation, 3), draw(Purpose::Shuffle, 3));
    }
}
