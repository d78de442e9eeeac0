//! Training and held-out examples, as text.
//!
//! Examples hold text, not tokens: the objective tokenizes them through the engine (prompts with
//! special tokens parsed, completions and candidates without) so that the same example works with
//! any engine. Each kind is validated on its own before training starts; which kind an objective
//! reads is the objective's business ([`crate::Objective::example_kind`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// One example. The kind decides which objectives can use it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TrainingExample {
    /// A prompt and the completion the model should give (teacher-forced cross-entropy).
    Completion { prompt: String, completion: String },
    /// A prompt, the candidate completions (e.g. " positive", " negative") and the index of the
    /// right one.
    Classification {
        prompt: String,
        candidates: Vec<String>,
        label: usize,
    },
    /// A prompt and the acceptable answers, graded on what greedy decoding produces.
    Generation {
        prompt: String,
        references: Vec<String>,
    },
    /// A prompt, a completion the model gave or could give, and how good it was, in [−1, 1].
    Reward {
        prompt: String,
        completion: String,
        reward: f32,
    },
}

/// The kinds of [`TrainingExample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExampleKind {
    Completion,
    Classification,
    Generation,
    Reward,
}

impl fmt::Display for ExampleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl ExampleKind {
    /// The kind's name, as in the serialized `kind` tag.
    pub fn name(self) -> &'static str {
        match self {
            ExampleKind::Completion => "completion",
            ExampleKind::Classification => "classification",
            ExampleKind::Generation => "generation",
            ExampleKind::Reward => "reward",
        }
    }
}

impl TrainingExample {
    pub fn kind(&self) -> ExampleKind {
        match self {
            TrainingExample::Completion { .. } => ExampleKind::Completion,
            TrainingExample::Classification { .. } => ExampleKind::Classification,
            TrainingExample::Generation { .. } => ExampleKind::Generation,
            TrainingExample::Reward { .. } => ExampleKind::Reward,
        }
    }

    pub fn prompt(&self) -> &str {
        match self {
            TrainingExample::Completion { prompt, .. }
            | TrainingExample::Classification { prompt, .. }
            | TrainingExample::Generation { prompt, .. }
            | TrainingExample::Reward { prompt, .. } => prompt,
        }
    }

    /// Checks what can be checked without an engine; `index` is the example's position, for the
    /// message.
    pub fn validate(&self, index: usize) -> Result<()> {
        // Without a prompt there is no position from which to predict the first token.
        if self.prompt().is_empty() {
            return Err(TrainError::example(index, "prompt", "non-empty", "\"\""));
        }
        match self {
            TrainingExample::Completion { completion, .. } => {
                non_empty(index, "completion", completion)
            }
            TrainingExample::Classification {
                candidates, label, ..
            } => {
                // With one candidate the cross-entropy is 0 whatever the adapter: nothing to learn.
                if candidates.len() < 2 {
                    return Err(TrainError::example(
                        index,
                        "candidates",
                        "a list of at least 2 completions",
                        format!("{} candidates", candidates.len()),
                    ));
                }
                for candidate in candidates {
                    non_empty(index, "candidates", candidate)?;
                }
                if *label >= candidates.len() {
                    return Err(TrainError::example(
                        index,
                        "label",
                        format!("an index into `candidates`, < {}", candidates.len()),
                        label,
                    ));
                }
                Ok(())
            }
            TrainingExample::Generation { references, .. } => {
                if references.is_empty() {
                    return Err(TrainError::example(
                        index,
                        "references",
                        "a list of at least 1 acceptable answer",
                        "an empty list",
                    ));
                }
                Ok(())
            }
            TrainingExample::Reward {
                completion, reward, ..
            } => {
                non_empty(index, "completion", completion)?;
                if !(-1.0..=1.0).contains(reward) {
                    return Err(TrainError::example(index, "reward", "in [-1, 1]", reward));
                }
                Ok(())
            }
        }
    }
}

fn non_empty(index: usize, field: &'static str, text: &str) -> Result<()> {
    if text.is_empty() {
        return Err(TrainError::example(index, field, "non-empty text", "\"\""));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(example: TrainingExample) -> String {
        example.validate(3).unwrap_err().to_string()
    }

    #[test]
    fn valid_examples_pass() {
        let examples = [
            TrainingExample::Completion {
                prompt: "2+2=".into(),
                completion: "4".into(),
            },
            TrainingExample::Classification {
                prompt: "Great film. Sentiment:".into(),
                candidates: vec![" negative".into(), " positive".into()],
                label: 1,
            },
            TrainingExample::Generation {
                prompt: "Capital of France?".into(),
                references: vec!["Paris".into()],
            },
            TrainingExample::Reward {
                prompt: "Hi".into(),
                completion: "Hello!".into(),
                reward: -1.0,
            },
        ];
        for example in examples {
            example.validate(0).unwrap();
        }
    }

    #[test]
    fn bad_examples_are_rejected_naming_the_field_limit_and_value() {
        assert_eq!(
            message(TrainingExample::Completion {
                prompt: "p".into(),
                completion: String::new(),
            }),
            "example 3: `completion` must be non-empty text (given \"\")"
        );
        assert_eq!(
            message(TrainingExample::Completion {
                prompt: String::new(),
                completion: "c".into(),
            }),
            "example 3: `prompt` must be non-empty (given \"\")"
        );
        let classification = |candidates: &[&str], label| TrainingExample::Classification {
            prompt: "p".into(),
            candidates: candidates.iter().map(|c| c.to_string()).collect(),
            label,
        };
        assert_eq!(
            message(classification(&["a", "b"], 2)),
            "example 3: `label` must be an index into `candidates`, < 2 (given 2)"
        );
        assert_eq!(
            message(classification(&[], 0)),
            "example 3: `candidates` must be a list of at least 2 completions (given 0 candidates)"
        );
        assert_eq!(
            message(classification(&["a", ""], 0)),
            "example 3: `candidates` must be non-empty text (given \"\")"
        );
        assert_eq!(
            message(TrainingExample::Generation {
                prompt: "p".into(),
                references: vec![],
            }),
            "example 3: `references` must be a list of at least 1 acceptable answer (given an empty list)"
        );
        for reward in [1.5, -1.01, f32::NAN] {
            let text = message(TrainingExample::Reward {
                prompt: "p".into(),
                completion: "c".into(),
                reward,
            });
            assert_eq!(
                text,
                format!("example 3: `reward` must be in [-1, 1] (given {reward})")
            );
        }
    }

    #[test]
    fn examples_serialize_with_a_kind_tag() {
        let example = TrainingExample::Classification {
            prompt: "p".into(),
            candidates: vec!["a".into(), "b".into()],
            label: 0,
        };
        let json = serde_json::to_string(&example).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"classification","prompt":"p","candidates":["a","b"],"label":0}"#
        );
        assert_eq!(
            serde_json::from_str::<TrainingExample>(&json).unwrap(),
            example
        );
    }
}
