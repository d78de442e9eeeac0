//! The plugin's one error type.
//!
//! Configuration and example errors are found before any forward pass runs and name the field,
//! the limit and the value given, so the server can hand the message to the user unchanged.
//! Engine failures are carried through boxed, whatever the engine's own error type is.

/// Everything that can go wrong while validating, training, evaluating or replaying.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A hyperparameter outside its domain, e.g. "`epsilon` must be > 0 (given -0.001)".
    #[error("`{field}` must be {limit} (given {given})")]
    InvalidConfig {
        field: &'static str,
        limit: String,
        given: String,
    },

    /// A training or held-out example that no objective could use as given.
    #[error("example {index}: `{field}` must be {limit} (given {given})")]
    InvalidExample {
        index: usize,
        field: &'static str,
        limit: String,
        given: String,
    },

    /// An example of a kind the chosen objective does not read.
    #[error("example {index} is a {given} example, but objective `{objective}` needs {expected} examples")]
    WrongExampleKind {
        index: usize,
        objective: &'static str,
        expected: &'static str,
        given: &'static str,
    },

    /// An error in the held-out examples (the index counts held-out examples).
    #[error("held-out {0}")]
    InHeldOutSet(Box<TrainError>),

    /// Text that the engine's tokenizer turned into no tokens: nothing to score.
    #[error("the {field} {text:?} tokenizes to no tokens; give a non-empty {field}")]
    NoTokens { field: &'static str, text: String },

    /// Another step was asked of a run that has done all of its steps.
    #[error("the run has done all of its {max_steps} steps; raise `max_steps` to train further")]
    RunFinished { max_steps: u64 },

    /// The engine answered with a result that does not match the request.
    #[error("the engine returned {given} where {expected} were expected")]
    EngineOutput { expected: String, given: String },

    /// The loss under θ+εz or θ−εz was NaN or infinite; the step is not applied.
    #[error("step {step}: the loss is not finite (L+ = {loss_plus}, L- = {loss_minus}); lower `lr` or `epsilon`")]
    NonFiniteLoss {
        step: u64,
        loss_plus: f64,
        loss_minus: f64,
    },

    /// A step record that cannot be applied to the adapter it is replayed on.
    #[error("step record {step}: {reason}")]
    InvalidStepRecord { step: u64, reason: String },

    /// The engine failed (its own error, boxed).
    #[error("engine: {0}")]
    Engine(Box<dyn std::error::Error + Send + Sync>),
}

impl TrainError {
    /// A config error for `field`, which must satisfy `limit` but was `given`.
    pub(crate) fn config(field: &'static str, limit: impl ToString, given: impl ToString) -> Self {
        TrainError::InvalidConfig {
            field,
            limit: limit.to_string(),
            given: given.to_string(),
        }
    }

    /// An error in example `index`'s `field`, which must satisfy `limit` but was `given`.
    pub(crate) fn example(
        index: usize,
        field: &'static str,
        limit: impl ToString,
        given: impl ToString,
    ) -> Self {
        TrainError::InvalidExample {
            index,
            field,
            limit: limit.to_string(),
            given: given.to_string(),
        }
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
