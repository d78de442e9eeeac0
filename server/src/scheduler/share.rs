//! How the engine's time is split between serving and training.
//!
//! Training runs in slices between serving steps. While requests are running or waiting, a
//! slice runs only if training's share of recent engine time is below `max_share`
//! (`training.max_engine_share`); with nothing to serve, training takes the engine whole. Recent
//! means exponentially weighted with a time constant of a few seconds, so a burst of requests
//! after a quiet minute is not starved by the training time banked during that minute.

use std::time::Duration;

/// Time constant of the moving window, in seconds.
const WINDOW_SECONDS: f64 = 5.0;

#[derive(Debug, Clone)]
pub struct EngineShare {
    max_share: f64,
    serving_seconds: f64,
    training_seconds: f64,
}

impl EngineShare {
    /// `max_share` in [0, 1]; 0 means training runs only when nothing is served.
    pub fn new(max_share: f64) -> Self {
        Self {
            max_share: max_share.clamp(0.0, 1.0),
            serving_seconds: 0.0,
            training_seconds: 0.0,
        }
    }

    pub fn record_serving(&mut self, spent: Duration) {
        self.decay(spent);
        self.serving_seconds += spent.as_secs_f64();
    }

    pub fn record_training(&mut self, spent: Duration) {
        self.decay(spent);
        self.training_seconds += spent.as_secs_f64();
    }

    /// Whether a training slice may run now.
    pub fn training_may_run(&self, serving_busy: bool) -> bool {
        if !serving_busy {
            return true;
        }
        let total = self.serving_seconds + self.training_seconds;
        total == 0.0 || self.training_seconds / total < self.max_share
    }

    fn decay(&mut self, elapsed: Duration) {
        let keep = (-elapsed.as_secs_f64() / WINDOW_SECONDS).exp();
        self.serving_seconds *= keep;
        self.training_seconds *= keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLICE: Duration = Duration::from_millis(100);

    /// Alternates as the engine loop does while serving is busy and returns training's share.
    fn busy_share(max_share: f64) -> f64 {
        let mut share = EngineShare::new(max_share);
        let (mut serving, mut training) = (0.0, 0.0);
        for _ in 0..2000 {
            share.record_serving(SLICE / 4);
            serving += 0.025;
            if share.training_may_run(true) {
                share.record_training(SLICE);
                training += 0.1;
            }
        }
        training / (serving + training)
    }

    #[test]
    fn busy_serving_keeps_training_near_its_share() {
        for max in [0.25, 0.5, 0.75] {
            let got = busy_share(max);
            // One slice of overshoot at most: a slice starts below the share and may end above.
            assert!((got - max).abs() < 0.1, "max {max}: training got {got}");
        }
        assert_eq!(busy_share(0.0), 0.0);
    }

    #[test]
    fn idle_serving_lets_training_run() {
        let mut share = EngineShare::new(0.0);
        share.record_training(Duration::from_secs(10));
        assert!(share.training_may_run(false));
        assert!(!share.training_may_run(true));
    }
}
