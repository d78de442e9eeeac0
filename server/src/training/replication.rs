//! Replication: each server makes what it serves match the database's versions, which other
//! servers sharing the database publish, roll back and delete.
//!
//! At start ([`Sync::CatchUp`]) a server writes every version it lacks from the files the
//! database keeps with it (PostgreSQL does; a long history is not replayed), else from its
//! job's step log, and restores the live versions.
//! While it runs ([`Sync::Follow`]), on PostgreSQL, a thread waits on the versions channel
//! (`LISTEN`) and looks at the database after each announcement, and at least every
//! [`POLL`] (announcements sent while its connection was down are lost). A version a job made
//! is rebuilt by replaying the job's step log onto the job's initial adapter: a MeZO update
//! travels as a few bytes per step, and replay is bit-exact, which the rebuilt weights' digest
//! confirms against the publisher's; the stored files are the fallback.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use adapters::peft::PeftFiles;

use super::db::{sha256_hex, VersionHead, VersionNotices};
use super::{Shared, TrainingError};
use crate::ids::unix_now_ms;
use crate::metrics as m;

/// How often the database is looked at without an announcement.
const POLL: Duration = Duration::from_secs(2);

/// How a sync gets the versions a server lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sync {
    /// At start: from the stored files.
    CatchUp,
    /// While serving: by replaying the step log, falling back to the stored files.
    Follow,
}

/// How a version was obtained, for the log.
enum Obtained {
    Replayed { steps: u64 },
    Stored,
}

/// The replication thread: follows the versions channel until the server stops.
pub(super) fn run(shared: Arc<Shared>, mut notices: VersionNotices) {
    let mut failing: Option<String> = None;
    while !shared.is_shutting_down() {
        let outcome = notices
            .wait(POLL)
            .map_err(TrainingError::from)
            .and_then(|_| shared.sync_versions(Sync::Follow));
        match outcome {
            Ok(()) => {
                if failing.take().is_some() {
                    tracing::info!("following the database's adapter versions again");
                }
            }
            Err(err) => {
                let message = err.to_string();
                // Once per kind of failure, not at every poll while the database is down.
                if failing.as_deref() != Some(message.as_str()) {
                    tracing::warn!(error = %message, "cannot follow the database's adapter versions; retrying");
                    failing = Some(message);
                }
                std::thread::sleep(POLL);
            }
        }
        shared.update_job_gauges();
    }
}

impl Shared {
    /// Makes the served versions match the database's: writes and serves the versions this
    /// server lacks (in order, so a job's base version is there before the versions it made),
    /// removes adapters another server deleted, and moves live pointers that another server
    /// moved.
    pub(super) fn sync_versions(&self, how: Sync) -> Result<(), TrainingError> {
        let _gate = self
            .publish_gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let heads = self.db.version_heads()?;
        let registry = self.adapters.registry();
        for head in &heads {
            let name = format!("{}@{}", head.adapter, head.version);
            if registry.resolve(&name).is_ok() {
                continue;
            }
            match self.obtain_version(head, how)? {
                Some((files, obtained)) => {
                    self.install_version(&head.adapter, head.version, &files)?;
                    let lag_seconds = head
                        .published_ms
                        .map(|at| unix_now_ms().saturating_sub(at) as f64 / 1000.0);
                    if let (Sync::Follow, Some(lag)) = (how, lag_seconds) {
                        metrics::histogram!(m::REPLICATION_LAG_SECONDS).record(lag);
                    }
                    match obtained {
                        Obtained::Replayed { steps } => tracing::info!(
                            adapter = %head.adapter,
                            version = head.version,
                            steps,
                            lag_seconds,
                            "serving a version rebuilt from its job's step log"
                        ),
                        Obtained::Stored => tracing::info!(
                            adapter = %head.adapter,
                            version = head.version,
                            lag_seconds,
                            "serving a version from the database's copy of its files"
                        ),
                    }
                }
                None => {
                    let first_time = self
                        .unobtainable_versions
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert((head.adapter.clone(), head.version));
                    if first_time {
                        tracing::warn!(
                            adapter = %head.adapter,
                            version = head.version,
                            "this version's folder is not here, the database has no copy of its \
                             files, and its job's step log cannot rebuild it; copy the folder from \
                             a server that has it to serve it"
                        );
                    }
                }
            }
        }
        self.remove_deleted_adapters(&heads)?;
        for (name, version) in self.db.live_versions()? {
            let live_here = registry.versions(&name).map(|(_, live)| live);
            if live_here.is_some() && live_here != Some(version) {
                match self.adapters.set_live(&name, version) {
                    Ok(()) => tracing::info!(adapter = %name, version, "live version set"),
                    Err(err) => {
                        tracing::warn!(adapter = %name, version, error = %err, "cannot set the live version")
                    }
                }
            }
        }
        Ok(())
    }

    /// The files of a version this server lacks, and how they were obtained; `None` when the
    /// database has no files for it and it cannot be replayed. While following, replay comes
    /// first (the files need not cross the network); at start the stored files do (a long
    /// history is not replayed), and replay is the fallback (SQLite keeps no files, and a
    /// database copied from one has none).
    fn obtain_version(
        &self,
        head: &VersionHead,
        how: Sync,
    ) -> Result<Option<(PeftFiles, Obtained)>, TrainingError> {
        if how == Sync::Follow {
            if let Some(replayed) = self.replayed_version(head) {
                return Ok(Some(replayed));
            }
        }
        if let Some(files) = self.db.version_files(&head.adapter, head.version)? {
            return Ok(Some((files, Obtained::Stored)));
        }
        Ok(match how {
            Sync::CatchUp => self.replayed_version(head),
            Sync::Follow => None,
        })
    }

    /// `head` rebuilt from its job's step log, when it was made by a job and the rebuilt
    /// weights have the publisher's digest (or the publisher, an earlier release, recorded none).
    fn replayed_version(&self, head: &VersionHead) -> Option<(PeftFiles, Obtained)> {
        let (Some(job_id), Some(steps)) = (&head.job_id, head.step) else {
            return None;
        };
        match self.replay_version(job_id, steps) {
            Ok(files)
                if head
                    .weights_sha256
                    .as_ref()
                    .is_none_or(|sha| *sha == sha256_hex(&files.weights)) =>
            {
                Some((files, Obtained::Replayed { steps }))
            }
            Ok(_) => {
                tracing::warn!(
                    adapter = %head.adapter,
                    version = head.version,
                    "the version rebuilt from its step log differs from the publisher's (another \
                     model file or build?)"
                );
                None
            }
            Err(reason) => {
                tracing::debug!(
                    adapter = %head.adapter,
                    version = head.version,
                    %reason,
                    "cannot rebuild the version from its step log"
                );
                None
            }
        }
    }

    /// The files of the version job `job_id` published after `steps` steps, rebuilt as the job
    /// made it: its initial adapter and its first `steps` steps.
    fn replay_version(&self, job_id: &str, steps: u64) -> Result<PeftFiles, String> {
        let job = self
            .db
            .job(job_id)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("job `{job_id}` is not in the database"))?;
        let log = self.db.step_log(job_id).map_err(|e| e.to_string())?;
        let log = usize::try_from(steps)
            .ok()
            .and_then(|steps| log.get(..steps))
            .ok_or_else(|| format!("the step log has {} steps, not {steps}", log.len()))?;
        let initial = self.initial_adapter(&job.spec)?;
        let theta = plugin::replay(&initial, log).map_err(|e| e.to_string())?;
        self.adapters.files_of(&theta).map_err(|e| e.to_string())
    }

    /// Stops serving adapters that had versions in the database and have none now: another
    /// server deleted them. (Folders put in the adapters folder by hand were never there.)
    fn remove_deleted_adapters(&self, heads: &[VersionHead]) -> Result<(), TrainingError> {
        let mut known = self
            .adapters_in_db
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let deleted: Vec<String> = known
            .iter()
            .filter(|name| !heads.iter().any(|h| &h.adapter == *name))
            .cloned()
            .collect();
        for name in deleted {
            self.adapters.delete(&name)?;
            known.remove(&name);
            tracing::info!(adapter = %name, "adapter deleted by another replica");
        }
        known.extend(heads.iter().map(|h| h.adapter.clone()));
        Ok(())
    }
}
