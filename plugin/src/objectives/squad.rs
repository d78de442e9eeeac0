//! Grading free-form answers the SQuAD way, and the greedy decoding that produces them.
//!
//! Normalisation follows the official SQuAD evaluation script: lower case, drop ASCII punctuation,
//! drop the articles "a", "an", "the", collapse whitespace. One difference: articles are removed
//! as whole whitespace-separated words, where the script's regex also splits at non-ASCII
//! punctuation (`the—end`); answers rarely hinge on that. Token F1 follows SQuAD v2, where an empty
//! answer matches only an empty reference. Both metrics take the best over the references.

use std::collections::{BTreeMap, HashMap};

use adapters::LoraAdapter;

use super::{generate_greedy, mean, prompt_tokens, wrong_kind, Evaluation, Objective};
use crate::{DynEngine, Result, TrainingExample};

/// SQuAD's `normalize_answer`.
pub fn normalize_answer(text: &str) -> String {
    let lowered = text.to_lowercase();
    let without_punctuation: String = lowered
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    without_punctuation
        .split_whitespace()
        .filter(|word| !matches!(*word, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// 1 if the normalised answer equals the normalised reference, else 0.
pub fn exact_match(answer: &str, reference: &str) -> f64 {
    if normalize_answer(answer) == normalize_answer(reference) {
        1.0
    } else {
        0.0
    }
}

/// Harmonic mean of precision and recall of the normalised answer's words against the reference's
/// (as multisets).
pub fn token_f1(answer: &str, reference: &str) -> f64 {
    let answer = normalize_answer(answer);
    let reference = normalize_answer(reference);
    let answer_words: Vec<&str> = answer.split_whitespace().collect();
    let reference_words: Vec<&str> = reference.split_whitespace().collect();
    if answer_words.is_empty() || reference_words.is_empty() {
        return exact_match(&answer, &reference);
    }
    let mut reference_counts: HashMap<&str, usize> = HashMap::new();
    for word in &reference_words {
        *reference_counts.entry(word).or_default() += 1;
    }
    let mut common = 0usize;
    for word in &answer_words {
        if let Some(count) = reference_counts.get_mut(word).filter(|c| **c > 0) {
            *count -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / answer_words.len() as f64;
    let recall = common as f64 / reference_words.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// A grade of an answer against one reference.
pub(super) type Grader = fn(&str, &str) -> f64;

/// Greedy answers to `batch` under each adapter (one engine call), graded by `metric` against the
/// best reference: `result[adapter][example]`.
pub(super) fn graded_answers(
    objective: &dyn Objective,
    engine: &dyn DynEngine,
    adapters: &[&LoraAdapter],
    batch: &[&TrainingExample],
    max_new_tokens: usize,
    metrics: &[Grader],
) -> Result<Vec<Vec<Vec<f64>>>> {
    let mut prompts = Vec::with_capacity(batch.len());
    let mut references = Vec::with_capacity(batch.len());
    for (index, example) in batch.iter().enumerate() {
        let TrainingExample::Generation {
            prompt,
            references: refs,
        } = example
        else {
            return Err(wrong_kind(objective, index, example));
        };
        prompts.push(prompt_tokens(engine, prompt)?);
        references.push(refs);
    }
    let answers = generate_greedy(engine, adapters, &prompts, max_new_tokens)?;
    Ok(answers
        .iter()
        .map(|per_example| {
            per_example
                .iter()
                .zip(&references)
                .map(|(answer, refs)| {
                    metrics
                        .iter()
                        .map(|metric| best_over_references(*metric, answer, refs))
                        .collect()
                })
                .collect()
        })
        .collect())
}

fn best_over_references(metric: Grader, answer: &str, references: &[String]) -> f64 {
    references
        .iter()
        .map(|reference| metric(answer, reference))
        .fold(0.0, f64::max)
}

/// −mean of `metric` per adapter.
pub(super) fn answer_losses(
    objective: &dyn Objective,
    engine: &dyn DynEngine,
    adapters: &[&LoraAdapter],
    batch: &[&TrainingExample],
    max_new_tokens: usize,
    metric: Grader,
) -> Result<Vec<f64>> {
    let graded = graded_answers(
        objective,
        engine,
        adapters,
        batch,
        max_new_tokens,
        &[metric],
    )?;
    Ok(graded
        .iter()
        .map(|per_example| -mean(per_example.iter().map(|m| m[0])))
        .collect())
}

/// Token F1 and exact match of one adapter's greedy answers, from one decoding.
pub(super) struct AnswerScores {
    pub(super) token_f1: f64,
    pub(super) exact_match: f64,
}

impl AnswerScores {
    pub(super) fn compute(
        objective: &dyn Objective,
        engine: &dyn DynEngine,
        adapter: &LoraAdapter,
        examples: &[&TrainingExample],
        max_new_tokens: usize,
    ) -> Result<Self> {
        let graded = graded_answers(
            objective,
            engine,
            &[adapter],
            examples,
            max_new_tokens,
            &[token_f1, exact_match],
        )?;
        // One adapter in, so one set of answers out: `generate_greedy` checked the shape.
        let per_example = &graded[0];
        Ok(Self {
            token_f1: mean(per_example.iter().map(|m| m[0])),
            exact_match: mean(per_example.iter().map(|m| m[1])),
        })
    }

    /// Both metrics, with the objective's own `loss`.
    pub(super) fn evaluation(&self, loss: f64) -> Evaluation {
        Evaluation {
            loss,
            metrics: BTreeMap::from([
                ("token_f1".to_string(), self.token_f1),
                ("exact_match".to_string(), self.exact_match),
            ]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_matches_squad() {
        // Expected values are what SQuAD's `normalize_answer` returns for these inputs.
        assert_eq!(normalize_answer("The  Eiffel Tower!"), "eiffel tower");
        assert_eq!(
            normalize_answer("  A cat, an owl; THE end. "),
            "cat owl end"
        );
        assert_eq!(normalize_answer("theatre anthem"), "theatre anthem");
        assert_eq!(normalize_answer("rock'n'roll"), "rocknroll");
        assert_eq!(normalize_answer("..."), "");
    }

    #[test]
    fn exact_match_compares_normalised_text() {
        assert_eq!(exact_match("The Louvre.", "louvre"), 1.0);
        assert_eq!(exact_match("Louvre museum", "louvre"), 0.0);
    }

    #[test]
    fn token_f1_on_known_strings() {
        // answer words {eiffel, tower, paris}, reference {eiffel, tower}: 2 common,
        // precision 2/3, recall 1, F1 = 2·(2/3)·1 / (2/3 + 1) = 0.8.
        assert!((token_f1("The Eiffel Tower, Paris", "Eiffel Tower") - 0.8).abs() < 1e-12);
        // Repeated words count once per occurrence: answer {a1, a1}, reference {a1}:
        // precision 1/2, recall 1, F1 = 2/3.
        assert!((token_f1("paris paris", "paris") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(token_f1("London", "Paris"), 0.0);
        assert_eq!(token_f1("Paris", "paris."), 1.0);
        // SQuAD v2: an empty answer scores 1 only against an empty reference.
        assert_eq!(token_f1("the", ""), 1.0);
        assert_eq!(token_f1("", "Paris"), 0.0);
    }

    #[test]
    fn best_reference_wins() {
        let references = ["Paris".to_string(), "the city of Paris".to_string()];
        // 3 words {city, of, paris} vs answer {city, paris}: precision 1, recall 2/3, F1 0.8.
        assert!((best_over_references(token_f1, "city Paris", &references) - 0.8).abs() < 1e-12);
        assert_eq!(best_over_references(exact_match, "paris", &references), 1.0);
    }
}
