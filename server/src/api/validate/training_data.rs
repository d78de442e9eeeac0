//! Training data in requests: examples in their formats, objectives, hyperparameters, all checked
//! with errors that name the field (`examples[3].label`, `hyperparameters.lr`).
//!
//! Example formats, told apart by their fields:
//! - chat: `{"messages": [..., {"role": "assistant", "content": answer}]}`, the conversation up
//!   to the last message rendered with the model's chat template as the prompt and the last
//!   (assistant) message as the completion to learn; with `candidates` + `label` or
//!   `references`, the whole conversation is the prompt and the assistant's reply is graded;
//! - `{"prompt", "completion"}` (with `"reward"`: a rated completion for the `reward` objective);
//! - classification: `{"prompt", "candidates", "label"}`, the label an index or a candidate;
//! - references: `{"prompt", "references"}`, graded on greedy answers (`f1`, `exact_match`).

use plugin::{ObjectiveKind, TrainerConfig, TrainingExample};
use serde::Deserialize;
use serde_json::Value;

use crate::engine::chat_template::{ChatMessage, ChatTemplate};

use super::chat::convert_messages;
use crate::api::error::ApiError;
use crate::api::protocol::ChatMessageIn;

/// One training example as sent; which fields are given tells its format (above).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExampleIn {
    messages: Option<Vec<ChatMessageIn>>,
    prompt: Option<String>,
    completion: Option<String>,
    candidates: Option<Vec<String>>,
    label: Option<LabelIn>,
    references: Option<Vec<String>>,
    reward: Option<f32>,
}

/// A classification label: the candidate's index or its text.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum LabelIn {
    Index(usize),
    Text(String),
}

const FORMATS: &str = "`messages` (ending with the assistant's answer), `prompt` + `completion` (+ `reward`), `prompt` + `candidates` + `label`, or `prompt` + `references`";

/// Reads one example; `param` is its path in the request (`examples[3]`). Chat examples are
/// rendered with `template`; `None` (a base model without one) refuses them.
pub fn parse_example(
    value: &Value,
    param: &str,
    template: Option<&ChatTemplate>,
) -> Result<TrainingExample, ApiError> {
    let example: ExampleIn = serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." {
            param.to_string()
        } else {
            format!("{param}.{path}")
        };
        ApiError::invalid(field.clone(), format!("`{field}`: {}", err.into_inner()))
    })?;
    let missing = |field: &str| {
        ApiError::invalid(
            format!("{param}.{field}"),
            format!("`{param}` has no `{field}`; an example is one of {FORMATS}"),
        )
    };
    let prompt = match &example.messages {
        Some(messages) => {
            if example.prompt.is_some() || example.completion.is_some() {
                return Err(ApiError::invalid(
                    format!("{param}.messages"),
                    format!("`{param}` has both `messages` and `prompt`/`completion`; give one"),
                ));
            }
            let template = template.ok_or_else(|| {
                ApiError::invalid(
                    format!("{param}.messages"),
                    format!("`{param}` is a chat example, but this model has no chat template to format it; give `prompt` + `completion` examples, or start the server with `--chat-template FILE`"),
                )
            })?;
            let mut converted = convert_messages(messages, &format!("{param}."))?;
            let render = |messages: &[ChatMessage]| {
                template
                    .render(messages, true)
                    .map_err(|e| ApiError::invalid(format!("{param}.messages"), e.to_string()))
            };
            let graded = example.candidates.is_some() || example.references.is_some();
            if graded {
                // The conversation is the prompt; the candidates or references are graded as
                // the assistant's next message.
                render(&converted)?
            } else {
                let last = converted.len() - 1;
                if converted[last].role != "assistant" {
                    return Err(ApiError::invalid(
                        format!("{param}.messages[{last}].role"),
                        format!("the last message of `{param}.messages` must be the assistant's answer to learn (or give `candidates` or `references` to grade)"),
                    ));
                }
                let answer = converted.pop().map(|m| m.content).unwrap_or_default();
                if converted.is_empty() {
                    return Err(ApiError::invalid(
                        format!("{param}.messages"),
                        format!("`{param}.messages` needs at least one message before the answer"),
                    ));
                }
                let prompt = render(&converted)?;
                return Ok(match example.reward {
                    Some(reward) => TrainingExample::Reward {
                        prompt,
                        completion: answer,
                        reward,
                    },
                    None => TrainingExample::Completion {
                        prompt,
                        completion: answer,
                    },
                });
            }
        }
        None => example.prompt.ok_or_else(|| missing("prompt"))?,
    };
    if let Some(candidates) = example.candidates {
        let label = match example.label.ok_or_else(|| missing("label"))? {
            LabelIn::Index(i) => i,
            LabelIn::Text(text) => candidates.iter().position(|c| *c == text).ok_or_else(|| {
                ApiError::invalid(
                    format!("{param}.label"),
                    format!("`{param}.label` is {text:?}, which is not one of the candidates"),
                )
            })?,
        };
        return Ok(TrainingExample::Classification {
            prompt,
            candidates,
            label,
        });
    }
    if let Some(references) = example.references {
        return Ok(TrainingExample::Generation { prompt, references });
    }
    let completion = example.completion.ok_or_else(|| missing("completion"))?;
    Ok(match example.reward {
        Some(reward) => TrainingExample::Reward {
            prompt,
            completion,
            reward,
        },
        None => TrainingExample::Completion { prompt, completion },
    })
}

/// Reads a list of examples at `field` (`examples`, `eval_examples`).
pub fn parse_examples(
    value: Option<&Value>,
    field: &str,
    template: Option<&ChatTemplate>,
) -> Result<Vec<TrainingExample>, ApiError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let Some(items) = value.as_array() else {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` must be a list of examples"),
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_example(item, &format!("{field}[{i}]"), template))
        .collect()
}

/// `"classification"` or `{"type": "f1", "max_new_tokens": 16}`.
pub fn parse_objective(value: Option<&Value>) -> Result<ObjectiveKind, ApiError> {
    const NAMES: &str =
        "completion, classification, accuracy, f1 (token_f1), exact_match or reward";
    let value = match value {
        None => {
            return Err(ApiError::invalid(
                "objective",
                format!("`objective` is missing; use one of {NAMES}"),
            ))
        }
        Some(Value::String(name)) => serde_json::json!({ "type": name }),
        Some(other) => other.clone(),
    };
    serde_json::from_value(value).map_err(|e| {
        ApiError::invalid(
            "objective",
            format!("`objective` is not one of {NAMES}: {e}"),
        )
    })
}

/// The trainer's settings from `hyperparameters` (every key optional; unknown keys are
/// errors). `batch_size` defaults to 16 or the number of training examples if fewer.
pub fn parse_hyperparameters(
    value: Option<&Value>,
    train_examples: usize,
) -> Result<TrainerConfig, ApiError> {
    let defaults = TrainerConfig {
        batch_size: train_examples.clamp(1, TrainerConfig::default().batch_size),
        ..TrainerConfig::default()
    };
    let Some(value) = value else {
        return Ok(defaults);
    };
    let Some(given) = value.as_object() else {
        return Err(ApiError::invalid(
            "hyperparameters",
            "`hyperparameters` must be an object",
        ));
    };
    let mut merged = serde_json::to_value(&defaults).expect("the trainer's config serializes");
    let known = merged
        .as_object_mut()
        .expect("the trainer's config is an object");
    for (key, v) in given {
        if !known.contains_key(key) {
            let mut names: Vec<&String> = known.keys().collect();
            names.sort();
            let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            return Err(ApiError::invalid(
                format!("hyperparameters.{key}"),
                format!(
                    "`hyperparameters.{key}` is not a hyperparameter; use {}",
                    names.join(", ")
                ),
            ));
        }
        known.insert(key.clone(), v.clone());
    }
    serde_path_to_error::deserialize(merged).map_err(|err| {
        let path = err.path().to_string();
        ApiError::invalid(
            format!("hyperparameters.{path}"),
            format!("`hyperparameters.{path}`: {}", err.into_inner()),
        )
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use serde_json::json;

    /// A chat template that shows each role, for tests of chat examples.
    pub(in crate::api::validate) fn template() -> ChatTemplate {
        ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}".into(),
            String::new(),
            String::new(),
        )
        .unwrap()
    }

    #[test]
    fn each_format_becomes_its_example_kind() {
        let t = template();
        let chat = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]});
        assert_eq!(
            parse_example(&chat, "examples[0]", Some(&t)).unwrap(),
            TrainingExample::Completion {
                prompt: "<user>hi\n<assistant>".into(),
                completion: "hello".into()
            }
        );
        let by_text = json!({"prompt": "p", "candidates": [" a", " b"], "label": " b"});
        assert_eq!(
            parse_example(&by_text, "examples[0]", Some(&t)).unwrap(),
            TrainingExample::Classification {
                prompt: "p".into(),
                candidates: vec![" a".into(), " b".into()],
                label: 1
            }
        );
        let graded_chat = json!({"messages": [{"role": "user", "content": "mood?"}], "candidates": ["sad", "glad"], "label": 1});
        assert_eq!(
            parse_example(&graded_chat, "examples[0]", Some(&t)).unwrap(),
            TrainingExample::Classification {
                prompt: "<user>mood?\n<assistant>".into(),
                candidates: vec!["sad".into(), "glad".into()],
                label: 1
            }
        );
        let refs = json!({"prompt": "p", "references": ["x"]});
        assert!(matches!(
            parse_example(&refs, "e", Some(&t)).unwrap(),
            TrainingExample::Generation { .. }
        ));
        let rated = json!({"prompt": "p", "completion": "c", "reward": -0.5});
        assert!(matches!(
            parse_example(&rated, "e", Some(&t)).unwrap(),
            TrainingExample::Reward { reward, .. } if reward == -0.5
        ));
    }

    #[test]
    fn bad_examples_name_their_index_and_field() {
        let t = template();
        let cases = [
            (
                json!({"prompt": "p", "candidates": ["a", "b"], "label": "c"}),
                "examples[2].label",
            ),
            (
                json!({"prompt": "p", "candidates": ["a"]}),
                "examples[2].label",
            ),
            (
                json!({"prompt": 3, "completion": "c"}),
                "examples[2].prompt",
            ),
            (json!({"completion": "c"}), "examples[2].prompt"),
            (json!({"prompt": "p"}), "examples[2].completion"),
            (
                json!({"prompt": "p", "completoin": "c"}),
                "examples[2].completoin",
            ),
            (
                json!({"messages": [{"role": "user", "content": "hi"}]}),
                "examples[2].messages[0].role",
            ),
            (
                json!({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
                "examples[2].messages[0].role",
            ),
        ];
        for (example, param) in cases {
            let err = parse_example(&example, "examples[2]", Some(&t)).unwrap_err();
            assert_eq!(
                err.param.as_deref(),
                Some(param),
                "{example}: {}",
                err.message
            );
        }
    }

    #[test]
    fn hyperparameters_merge_over_defaults_and_reject_unknown_keys() {
        let config = parse_hyperparameters(Some(&json!({"lr": 0.01, "max_steps": 5})), 4).unwrap();
        assert_eq!(
            (config.lr, config.max_steps, config.batch_size),
            (0.01, 5, 4)
        );
        assert_eq!(parse_hyperparameters(None, 100).unwrap().batch_size, 16);
        let err = parse_hyperparameters(Some(&json!({"learning_rate": 1})), 4).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("hyperparameters.learning_rate"));
        let err = parse_hyperparameters(Some(&json!({"lr": "fast"})), 4).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("hyperparameters.lr"));
    }

    #[test]
    fn objectives_by_name_or_object() {
        assert_eq!(
            parse_objective(Some(&json!("classification"))).unwrap(),
            ObjectiveKind::Classification
        );
        assert_eq!(
            parse_objective(Some(&json!({"type": "f1", "max_new_tokens": 8}))).unwrap(),
            ObjectiveKind::TokenF1 { max_new_tokens: 8 }
        );
        assert!(parse_objective(Some(&json!("bleu"))).is_err());
        assert!(parse_objective(None).is_err());
    }
}
