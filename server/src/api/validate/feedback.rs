//! `POST /v1/feedback`: the request as sent ([`FeedbackRequest`]) becomes the training service's
//! [`Feedback`]: exactly one of `reward` (in [−1, 1]) or `rating` (`up` = 1, `down` = −1).

use crate::api::error::ApiError;
use crate::api::protocol::FeedbackRequest;
use crate::training::feedback::Feedback;

/// The feedback item `request` gives.
pub fn valid_feedback(request: FeedbackRequest) -> Result<Feedback, ApiError> {
    let (reward, kind) = match (request.reward, request.rating.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "rating",
                "give `reward` or `rating`, not both",
            ))
        }
        (Some(r), None) if r.is_finite() && (-1.0..=1.0).contains(&r) => (r, "reward"),
        (Some(r), None) => {
            return Err(ApiError::invalid(
                "reward",
                format!("`reward` must be in [-1, 1] (given {r})"),
            ))
        }
        (None, Some("up")) => (1.0, "up"),
        (None, Some("down")) => (-1.0, "down"),
        (None, Some(other)) => {
            return Err(ApiError::invalid(
                "rating",
                format!("`rating` must be \"up\" or \"down\" (given {other:?})"),
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "reward",
                "give `reward` (a number in [-1, 1]) or `rating` (\"up\" or \"down\")",
            ))
        }
    };
    Ok(Feedback {
        completion_id: request.completion_id,
        reward,
        corrected_answer: request.corrected_answer,
        adapter: request.adapter,
        kind,
    })
}
