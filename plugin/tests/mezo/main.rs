//! End-to-end tests of the MeZO plugin, on two in-memory engines: a fake one with hand-set
//! log-probs (objectives against hand-computed losses) and a tiny random-weight model on candle
//! (the estimator against autograd's gradient, evaluation modes, training, replay).

#![allow(clippy::unwrap_used)] // A test that hits an error should fail loudly.

mod eval_modes;
mod fake_engine;
mod gradient;
mod objectives;
mod tiny_model;
mod training;
mod validation;
