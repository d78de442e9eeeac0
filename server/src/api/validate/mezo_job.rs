//! `POST /v1/finetune`: the request as sent ([`FinetuneRequest`]) becomes the training service's
//! [`NewJob`]: the objective, examples (with a held-out split from `eval_fraction`), the
//! trainer's settings merged over its defaults, and `lora`, each checked with errors that name
//! the field.

use adapters::LoraConfig;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::api::error::ApiError;
use crate::api::protocol::FinetuneRequest;
use crate::engine::chat_template::ChatTemplate;
use crate::training::{JobOrigin, NewJob};

use super::training_data::{parse_examples, parse_hyperparameters, parse_objective};

/// The job `request` asks for; chat examples are rendered with `template` (refused without
/// one).
pub fn new_job(
    request: FinetuneRequest,
    template: Option<&ChatTemplate>,
) -> Result<NewJob, ApiError> {
    let Some(adapter) = request.adapter else {
        return Err(ApiError::invalid(
            "adapter",
            "`adapter` must name the adapter to train (a new name creates it)",
        ));
    };
    let objective = parse_objective(request.objective.as_ref())?;
    let mut train = parse_examples(request.examples.as_ref(), "examples", template)?;
    if train.is_empty() {
        return Err(ApiError::invalid(
            "examples",
            "`examples` must hold at least one training example",
        ));
    }
    let mut held_out = parse_examples(request.eval_examples.as_ref(), "eval_examples", template)?;
    if let Some(fraction) = request.eval_fraction {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(ApiError::invalid(
                "eval_fraction",
                "`eval_fraction` must be a number in (0, 1)",
            ));
        }
    }
    let given = request.hyperparameters.as_ref();
    let hyperparameters = parse_hyperparameters(given, train.len())?;
    if let Some(fraction) = request.eval_fraction {
        if !held_out.is_empty() {
            return Err(ApiError::invalid(
                "eval_fraction",
                "give `eval_examples` or `eval_fraction`, not both",
            ));
        }
        let count = ((train.len() as f64) * fraction).round() as usize;
        if count == 0 || count >= train.len() {
            return Err(ApiError::invalid(
                "eval_fraction",
                format!(
                    "`eval_fraction` {fraction} of {} examples leaves no held-out or no training examples",
                    train.len()
                ),
            ));
        }
        train.shuffle(&mut ChaCha8Rng::seed_from_u64(hyperparameters.seed));
        held_out = train.split_off(train.len() - count);
    }
    // With a split, the default batch follows the training part.
    let hyperparameters = match given {
        Some(given) if given.get("batch_size").is_some() => hyperparameters,
        given => parse_hyperparameters(given, train.len())?,
    };
    let lora = match request.lora {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => {
            let mut lora: LoraConfig = serde_json::from_value(value).map_err(|e| {
                ApiError::invalid(
                    "lora",
                    format!(
                        "`lora` takes `rank`, `alpha`, `targets`, `use_rslora` and `layers`, \
                         each optional: {e}"
                    ),
                )
            })?;
            // A set of layers, as in PEFT: the order and repeats of the list do not matter.
            lora.layers = lora.layers.map(LoraConfig::normalized_layers);
            Some(lora)
        }
    };
    if request.publish_every == Some(0) {
        return Err(ApiError::invalid(
            "publish_every",
            "`publish_every` must be a number of steps ≥ 1",
        ));
    }
    Ok(NewJob {
        adapter,
        objective,
        trainer: hyperparameters,
        lora,
        publish_every: request.publish_every,
        publish_only_if_improved: request.publish_only_if_improved.unwrap_or(false),
        train,
        held_out,
        origin: JobOrigin::Finetune,
        quota: None,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::extract::ApiJson;
    use crate::api::validate::training_data::tests::template;

    fn job(body: serde_json::Value) -> Result<NewJob, ApiError> {
        let request = ApiJson(body).parse()?;
        new_job(request, Some(&template()))
    }

    fn examples(n: usize) -> serde_json::Value {
        (0..n)
            .map(|i| json!({"prompt": format!("p{i}"), "candidates": [" a", " b"], "label": i % 2}))
            .collect()
    }

    #[test]
    fn a_request_becomes_its_job_with_a_seeded_held_out_split() {
        let body = json!({
            "adapter": "sentiment",
            "objective": "classification",
            "examples": examples(10),
            "eval_fraction": 0.2,
            "publish_every": 5,
        });
        let first = job(body.clone()).unwrap();
        assert_eq!(first.adapter, "sentiment");
        assert_eq!((first.train.len(), first.held_out.len()), (8, 2));
        // The default batch follows the training part; the split is the same every time.
        assert_eq!(first.trainer.batch_size, 8);
        assert_eq!(job(body).unwrap().held_out, first.held_out);
        assert_eq!(first.publish_every, Some(5));
        assert!(!first.publish_only_if_improved);
    }

    #[test]
    fn bad_fields_name_their_param() {
        let base = json!({"adapter": "a", "objective": "classification", "examples": examples(4)});
        for (change, param) in [
            (json!({"epochs": 3}), "epochs"),
            (json!({"adapter": null}), "adapter"),
            (json!({"adapter": 7}), "adapter"),
            (json!({"eval_fraction": 1.0}), "eval_fraction"),
            (json!({"eval_fraction": "half"}), "eval_fraction"),
            (json!({"publish_every": 0}), "publish_every"),
            (json!({"publish_every": -2}), "publish_every"),
            (
                json!({"publish_only_if_improved": "yes"}),
                "publish_only_if_improved",
            ),
            (json!({"lora": {"layer": [3]}}), "lora"),
            (json!({"examples": []}), "examples"),
        ] {
            let mut body = base.clone();
            for (key, value) in change.as_object().unwrap() {
                body[key] = value.clone();
            }
            let err = job(body.clone())
                .err()
                .unwrap_or_else(|| panic!("{body} was accepted"));
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {}", err.message);
        }
    }
}
