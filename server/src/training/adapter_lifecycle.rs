//! An adapter's lifecycle with its database rows, in one place: a version is published (the
//! database numbers it and keeps where it came from, the job, the step and the held-out
//! metrics, with its files in PostgreSQL and their digest in SQLite; then [`AdapterVersions`]
//! writes its folder and swaps it in) or loaded from a PEFT folder trained elsewhere, an older
//! version is made live again (the registry's pointer, and the database's so that it stays live
//! across restarts and reaches every replica), or the adapter is deleted (its jobs cancelled,
//! its folder and rows removed).
//!
//! Publishing, rolling back and deleting hold the publish gate, as the replication thread does
//! while it applies what other servers did: a deletion cancels the adapter's jobs before taking
//! it, so a job that was about to publish either did so before the deletion (which then removes
//! that version too) or finds itself cancelled, never recreating a deleted adapter.
//!
//! [`AdapterVersions`]: crate::adapter_versions::AdapterVersions

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::PoisonError;

use adapters::peft::PeftFiles;
use adapters::registry::ResolveError;
use adapters::LoraAdapter;

use super::db::{JobPublish, NewVersion};
use super::job::{HeldOutPoint, Progress, VersionInfo};
use super::{Shared, Training, TrainingError};
use crate::adapter_versions::PublishError;
use crate::ids::{unix_now, unix_now_ms};
use crate::metrics as m;

/// An adapter as it is served: each version, with what was recorded when it was published.
pub struct AdapterRecord {
    pub name: String,
    pub live: u32,
    pub versions: Vec<VersionRecord>,
}

pub struct VersionRecord {
    pub version: u32,
    pub created_at: u64,
    /// The memory its LoRA tensors take.
    pub size_bytes: usize,
    /// Its job, step and held-out metrics; `None` for a folder put in the adapters root by hand.
    pub published: Option<VersionInfo>,
}

impl Training {
    /// The names of the adapters served.
    pub fn adapter_names(&self) -> Vec<String> {
        let registry = self.shared.adapters.registry();
        registry.list().into_iter().map(|a| a.name).collect()
    }

    /// Serves the PEFT folder `dir` (trained elsewhere) as the next version of `name`, which it
    /// creates; an adapter already served under `name` gets it as its next version only
    /// `in_place` (vLLM's `load_inplace`), never as a stale copy. The folder is copied into the
    /// adapters store like any version, so it can be fine-tuned further.
    pub fn load_adapter(
        &self,
        name: &str,
        dir: &Path,
        in_place: bool,
    ) -> Result<VersionInfo, TrainingError> {
        let shared = &self.shared;
        if !in_place && shared.adapters.registry().contains(name) {
            return Err(TrainingError::Invalid {
                param: "lora_name".into(),
                message: format!(
                    "an adapter named `{name}` is already served; set `load_inplace: true` to \
                     serve this folder as its next version, or pick another name"
                ),
            });
        }
        let adapter = shared
            .adapters
            .read_peft(dir)
            .map_err(|e| TrainingError::Invalid {
                param: "lora_path".into(),
                message: format!("cannot load the adapter: {e}"),
            })?;
        let _gate = shared
            .publish_gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let info = shared
            .write_version(name, &adapter, None)?
            .expect("a version no job made needs no lease");
        tracing::info!(adapter = name, version = info.version, from = %dir.display(), "adapter loaded");
        Ok(info)
    }

    /// Every version of adapter `name` that is served.
    pub fn adapter(&self, name: &str) -> Result<AdapterRecord, TrainingError> {
        let (versions, live) = self
            .shared
            .adapters
            .registry()
            .versions(name)
            .ok_or_else(|| TrainingError::not_found("adapter", name))?;
        let mut history = self.shared.db.versions(name)?;
        let versions = versions
            .iter()
            .map(|v| VersionRecord {
                version: v.version,
                created_at: v.created,
                size_bytes: v.payload.view.size_bytes(),
                published: history
                    .iter()
                    .position(|h| h.version == v.version)
                    .map(|i| history.swap_remove(i)),
            })
            .collect();
        Ok(AdapterRecord {
            name: name.to_string(),
            live,
            versions,
        })
    }
}

/// Who made a version: the job and the step of its adapter.
pub(super) struct Provenance<'a> {
    pub job_id: &'a str,
    /// Steps done when the published adapter was taken.
    pub step: u64,
    /// Its held-out evaluation, when the job has held-out examples.
    pub held_out: Option<HeldOutPoint>,
    /// The job's progress with this publish but for the version's number (stored with the
    /// version, which appends its number).
    pub progress: &'a Progress,
}

impl Shared {
    /// Publishes `adapter` as the next version of `name` and records where it came from; `None`
    /// when the job was cancelled first (its adapter may be being deleted) or is no longer this
    /// server's.
    pub(super) fn publish_version(
        &self,
        name: &str,
        adapter: &LoraAdapter,
        made_by: Provenance<'_>,
        cancelled: &AtomicBool,
    ) -> Result<Option<VersionInfo>, TrainingError> {
        let _gate = self
            .publish_gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if cancelled.load(Ordering::SeqCst) {
            return Ok(None);
        }
        self.write_version(name, adapter, Some(made_by))
    }

    /// Stores `adapter` as the next version of `name` (the database numbers it, with its
    /// files and its maker: a job's, or `None` for one loaded from elsewhere), then writes its
    /// folder and serves it, live at once; the caller holds the publish gate. `None` when the
    /// job that made it no longer holds its lease.
    fn write_version(
        &self,
        name: &str,
        adapter: &LoraAdapter,
        made_by: Option<Provenance<'_>>,
    ) -> Result<Option<VersionInfo>, TrainingError> {
        adapters::store::validate_name(name).map_err(PublishError::from)?;
        let files = self.adapters.files_of(adapter)?;
        let created_at = unix_now();
        let published_ms = unix_now_ms();
        let new = NewVersion {
            adapter: name,
            files: &files,
            created_at,
            published_ms,
            local_floor: self.adapters.highest_local_version(name),
            made_by: made_by.as_ref().map(|m| JobPublish {
                job_id: m.job_id,
                step: m.step,
                held_out: m.held_out.as_ref(),
                lease: &self.lease,
                progress: m.progress,
            }),
        };
        let previous_live = self
            .adapters
            .registry()
            .versions(name)
            .map(|(_, live)| live);
        let Some(version) = self.db.publish_version(&new)? else {
            return Ok(None);
        };
        if let Err(err) = self.install_version(name, version, &files) {
            // The version would be listed, and live, with no folder to serve it from.
            let job = made_by.as_ref().map(|m| (m.job_id, m.progress));
            if let Err(undo) = self.db.withdraw_version(name, version, previous_live, job) {
                tracing::warn!(adapter = name, version, error = %undo, "cannot withdraw the version from the database");
            }
            return Err(err.into());
        }
        self.adapters
            .set_live(name, version)
            .expect("the version was installed just above");
        metrics::counter!(m::ADAPTER_PUBLISHES_TOTAL, "adapter" => m::adapter_label(name))
            .increment(1);
        tracing::info!(adapter = name, version, "adapter version published");
        Ok(Some(VersionInfo {
            version,
            created_at,
            job_id: made_by.as_ref().map(|m| m.job_id.to_string()),
            step: made_by.as_ref().map(|m| m.step),
            held_out: made_by.and_then(|m| m.held_out),
        }))
    }

    /// Writes and serves `name@version` from `files`, and remembers that the database has
    /// versions of `name`; the caller holds the publish gate.
    pub(super) fn install_version(
        &self,
        name: &str,
        version: u32,
        files: &PeftFiles,
    ) -> Result<(), PublishError> {
        self.adapters.install(name, version, files)?;
        self.adapters_in_db
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string());
        Ok(())
    }

    /// Makes `version` of `name` live again, and remembers it across restarts.
    pub(super) fn rollback(&self, name: &str, version: u32) -> Result<(), TrainingError> {
        // Held so that the replication thread never applies an older live pointer over this.
        let _gate = self
            .publish_gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.adapters.set_live(name, version).map_err(|e| match e {
            ResolveError::UnknownAdapter(_) => TrainingError::not_found("adapter", name),
            _ => TrainingError::NotFound {
                what: "adapter version",
                id: format!("{name}@{version}"),
            },
        })?;
        self.db.set_live_version(name, version)?;
        tracing::info!(adapter = name, version, "adapter rolled back");
        Ok(())
    }

    /// Cancels the adapter's jobs, stops serving it, deletes its folder and history.
    pub(super) fn delete_adapter(&self, name: &str) -> Result<(), TrainingError> {
        let unfinished = self.db.unfinished_jobs_of(name)?;
        // A new adapter exists from its first job on, before it has a version to serve.
        if self.adapters.registry().versions(name).is_none() && unfinished.is_empty() {
            return Err(TrainingError::not_found("adapter", name));
        }
        for job in &unfinished {
            self.cancel_unfinished(job)?;
        }
        let _gate = self
            .publish_gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.adapters.delete(name)?;
        self.adapters_in_db
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        self.db.delete_adapter(name)?;
        self.update_job_gauges();
        tracing::info!(adapter = name, "adapter deleted");
        Ok(())
    }
}
