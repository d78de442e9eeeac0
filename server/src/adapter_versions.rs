//! The adapter versions the server serves, and their hot swap.
//!
//! Each version is an immutable PEFT folder on disk (`<data>/adapters/<name>/v<N>/`) and, once
//! loaded, the engine's tensors for it ([`AdapterView`]) in the lock-free registry. Publishing a
//! version writes its folder atomically (a hidden temporary folder, every file fsynced, renamed
//! into place, the parent fsynced), then swaps the registry's pointer: requests that already
//! resolved the previous version finish on it, new ones get the new one. Only the LoRA tensors
//! are new memory; the base model is shared by every version.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::UNIX_EPOCH;

use adapters::peft::PeftFiles;
use adapters::registry::{AdapterRegistry, AdapterVersion, ResolveError};
use adapters::{AdapterError, LoraAdapter, ModelDims};

use crate::engine::loaded_model::LoadedModel;
use crate::engine::lora::AdapterView;
use crate::ids::unix_now;
use crate::metrics as m;

/// Largest adapter file read at start-up: a rank-64 adapter on every linear layer of a 1B model
/// is ~100 MB, so this only stops mistakes (a model file dropped into the adapters folder).
const MAX_ADAPTER_FILE_BYTES: u64 = 1 << 30;

/// One loaded adapter version: the engine's tensors and where they came from.
#[derive(Debug)]
pub struct ServedAdapter {
    pub view: Arc<AdapterView>,
    pub dir: PathBuf,
}

pub type ServedAdapterVersion = AdapterVersion<ServedAdapter>;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("cannot write adapter folder {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the adapter does not fit the model: {0}")]
    Engine(#[from] crate::engine::EngineError),
}

pub struct AdapterVersions {
    registry: AdapterRegistry<ServedAdapter>,
    root: PathBuf,
    dims: ModelDims,
    /// Written into each version's `adapter_config.json`.
    base_model: String,
    /// Serialises publishes and deletes, which pick version numbers and touch folders.
    writer: Mutex<()>,
}

impl AdapterVersions {
    /// Loads every adapter version under `root`. A version that cannot be loaded is skipped with
    /// a warning naming the folder and the reason, so one bad upload does not stop the server.
    ///
    /// `published` lists the versions this server published (the database's record). Those
    /// whose files do not declare their q/k row order were written by an earlier version of the
    /// server in the engine's order; they are converted to PEFT's order once, here, with a log
    /// line, so that they serve as before and load in PEFT. Folders put there by hand are
    /// PEFT's own and already in its order.
    pub fn load(
        root: PathBuf,
        model: &LoadedModel,
        base_model: String,
        published: &HashSet<(String, u32)>,
    ) -> Self {
        let versions = Self {
            registry: AdapterRegistry::new(),
            root,
            dims: model.transformer.config.dims(),
            base_model,
            writer: Mutex::new(()),
        };
        remove_leftovers(&versions.root);
        let (found, warnings) = match adapters::store::scan(&versions.root) {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the adapters folder; serving none");
                return versions;
            }
        };
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        for stored in found {
            let published = published.contains(&(stored.name.clone(), stored.version));
            let loaded = convert_if_engine_order(&stored.dir, &versions.dims, published)
                .and_then(|()| {
                    adapters::peft::load_limited(
                        &stored.dir,
                        &versions.dims,
                        MAX_ADAPTER_FILE_BYTES,
                    )
                })
                .map_err(|e| e.to_string())
                .and_then(|lora| {
                    AdapterView::new(&lora, &versions.dims).map_err(|e| e.to_string())
                });
            match loaded {
                Ok(view) => {
                    let created = std::fs::metadata(&stored.dir)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or_else(unix_now, |d| d.as_secs());
                    tracing::info!(adapter = %stored.name, version = stored.version, dir = %stored.dir.display(), "adapter loaded");
                    versions.registry.insert(
                        &stored.name,
                        stored.version,
                        created,
                        ServedAdapter {
                            view,
                            dir: stored.dir,
                        },
                    );
                }
                Err(err) => {
                    tracing::warn!(dir = %stored.dir.display(), error = %err, "skipping adapter")
                }
            }
        }
        versions.update_gauges();
        versions
    }

    pub fn resolve(&self, model: &str) -> Result<Arc<ServedAdapterVersion>, ResolveError> {
        self.registry.resolve(model)
    }

    pub fn registry(&self) -> &AdapterRegistry<ServedAdapter> {
        &self.registry
    }

    pub fn dims(&self) -> ModelDims {
        self.dims
    }

    /// Reads version `version` of `name` back from its folder (a job continuing from it).
    pub fn load_lora(&self, name: &str, version: u32) -> Result<LoraAdapter, AdapterError> {
        let served = self
            .registry
            .resolve(&format!("{name}@{version}"))
            .map_err(|e| AdapterError::InvalidConfig(e.to_string()))?;
        adapters::peft::load_limited(&served.payload.dir, &self.dims, MAX_ADAPTER_FILE_BYTES)
    }

    /// Reads a PEFT adapter folder from elsewhere (one to load at runtime), checked against the
    /// model.
    pub fn read_peft(&self, dir: &Path) -> Result<LoraAdapter, AdapterError> {
        adapters::peft::load_limited(dir, &self.dims, MAX_ADAPTER_FILE_BYTES)
    }

    /// The PEFT files of `adapter` as this server writes them, once checked against the model.
    pub fn files_of(&self, adapter: &LoraAdapter) -> Result<PeftFiles, PublishError> {
        AdapterView::new(adapter, &self.dims)?;
        Ok(PeftFiles::of(adapter, &self.base_model)?)
    }

    /// The highest version number of `name` here, served or left on disk (0: none): a new
    /// version must take a higher one, never overwrite a folder.
    pub fn highest_local_version(&self, name: &str) -> u32 {
        let on_disk = highest_version_on_disk(&self.root.join(name));
        let served = self
            .registry
            .versions(name)
            .and_then(|(versions, _)| versions.last().map(|v| v.version))
            .unwrap_or(0);
        on_disk.max(served)
    }

    /// Writes `files` as version `version` of `name` (creating the name) and serves it; the
    /// live version changes only when this is the adapter's first (see [`Self::set_live`]).
    /// A folder already there under that number is replaced: the database, which numbered
    /// this version, is the record.
    pub fn install(
        &self,
        name: &str,
        version: u32,
        files: &PeftFiles,
    ) -> Result<Arc<ServedAdapterVersion>, PublishError> {
        adapters::store::validate_name(name)?;
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let parent = self.root.join(name);
        std::fs::create_dir_all(&parent).map_err(|source| PublishError::Io {
            path: parent.clone(),
            source,
        })?;
        let dir = adapters::store::version_dir(&self.root, name, version);
        write_version_folder(&parent, &dir, files)?;
        let lora = adapters::peft::load_limited(&dir, &self.dims, MAX_ADAPTER_FILE_BYTES)?;
        let view = AdapterView::new(&lora, &self.dims)?;
        self.registry.insert(
            name,
            version,
            unix_now(),
            ServedAdapter {
                view,
                dir: dir.clone(),
            },
        );
        self.update_gauges();
        tracing::info!(adapter = name, version, dir = %dir.display(), "adapter version written");
        Ok(self
            .registry
            .resolve(&format!("{name}@{version}"))
            .expect("the version was inserted just above"))
    }

    /// Makes an existing version live.
    pub fn set_live(&self, name: &str, version: u32) -> Result<(), ResolveError> {
        self.registry.set_live(name, version)?;
        self.update_gauges();
        Ok(())
    }

    /// Stops serving `name` and deletes its folder. Requests running on one of its versions
    /// finish on it. Returns whether it existed.
    pub fn delete(&self, name: &str) -> Result<bool, PublishError> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let existed = self.registry.remove(name);
        metrics::gauge!(m::ADAPTER_LIVE_VERSION, "adapter" => m::adapter_label(name)).set(0.0);
        let dir = self.root.join(name);
        if existed && dir.exists() {
            // Renamed first so that a crash mid-delete never leaves a half folder that would
            // load at the next start.
            let doomed = self.root.join(format!(".deleted-{name}-{}", unix_now()));
            let io = |source| PublishError::Io {
                path: dir.clone(),
                source,
            };
            std::fs::rename(&dir, &doomed).map_err(io)?;
            std::fs::remove_dir_all(&doomed).map_err(io)?;
        }
        self.update_gauges();
        Ok(existed)
    }

    fn update_gauges(&self) {
        let mut bytes = 0;
        for summary in self.registry.list() {
            metrics::gauge!(m::ADAPTER_LIVE_VERSION, "adapter" => m::adapter_label(&summary.name))
                .set(f64::from(summary.live));
            if let Some((versions, _)) = self.registry.versions(&summary.name) {
                bytes += versions
                    .iter()
                    .map(|v| v.payload.view.size_bytes())
                    .sum::<usize>();
            }
        }
        metrics::gauge!(m::ADAPTER_WEIGHTS_BYTES).set(bytes as f64);
    }
}

/// Folders a crash left half-written: a publish's temporary folder (`<name>/.publishing-*`) or
/// a delete's renamed folder (`.deleted-*`). Neither is ever served; removing them only frees
/// the disk.
fn remove_leftovers(root: &Path) {
    let hidden = |dir: &Path, prefix: &str| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path())
            .collect()
    };
    let mut leftovers = hidden(root, ".deleted-");
    for adapter in std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
    {
        leftovers.extend(hidden(&adapter.path(), ".publishing-"));
        leftovers.extend(hidden(&adapter.path(), ".replaced-"));
    }
    for dir in leftovers {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "removed a folder left by an interrupted publish or delete")
            }
            Err(err) => {
                tracing::warn!(dir = %dir.display(), error = %err, "cannot remove a leftover folder")
            }
        }
    }
}

fn highest_version_on_disk(parent: &Path) -> u32 {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix('v'))
                .and_then(|n| n.parse::<u32>().ok())
        })
        .max()
        .unwrap_or(0)
}

/// Writes `files` into a hidden temporary folder next to `dir`, then renames it to `dir` (a
/// folder already there is moved aside and removed first), so `dir` either does not exist or
/// holds a complete version.
fn write_version_folder(parent: &Path, dir: &Path, files: &PeftFiles) -> Result<(), PublishError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PublishError::Io { path, source }
    };
    let tmp = tempfile::Builder::new()
        .prefix(".publishing-")
        .tempdir_in(parent)
        .map_err(io(parent))?;
    files.write(tmp.path())?;
    if dir.exists() {
        let doomed = parent.join(format!(".replaced-{}", unix_now()));
        std::fs::rename(dir, &doomed).map_err(io(dir))?;
        std::fs::remove_dir_all(&doomed).map_err(io(&doomed))?;
    }
    let tmp_path = tmp.keep();
    if let Err(source) = std::fs::rename(&tmp_path, dir) {
        let _ = std::fs::remove_dir_all(&tmp_path);
        return Err(PublishError::Io {
            path: dir.to_path_buf(),
            source,
        });
    }
    std::fs::File::open(parent)
        .and_then(|f| f.sync_all())
        .map_err(io(parent))
}

/// Converts a version folder that this server `published` before files recorded their q/k row
/// order (see [`AdapterVersions::load`]); any other folder is left alone. When the conversion
/// fails the version is not served (it would be read in the wrong order) and its folder stays
/// as it was, to be converted at the next start.
fn convert_if_engine_order(
    dir: &Path,
    dims: &ModelDims,
    published: bool,
) -> Result<(), AdapterError> {
    if !published || adapters::peft::stored_row_order(dir)?.is_some() {
        return Ok(());
    }
    adapters::peft::convert_engine_order_folder(dir, dims, MAX_ADAPTER_FILE_BYTES)?;
    tracing::info!(
        dir = %dir.display(),
        "converted an adapter version published by an earlier release from the engine's q/k row \
         order to PEFT's; it serves exactly as before and now loads in PEFT too"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_numbers_on_disk_are_found() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(highest_version_on_disk(root.path()), 0);
        for name in ["v1", "v12", "v3", ".publishing-x", "notes"] {
            std::fs::create_dir(root.path().join(name)).unwrap();
        }
        assert_eq!(highest_version_on_disk(root.path()), 12);
    }

    #[test]
    fn leftovers_of_interrupted_publishes_and_deletes_are_removed() {
        let root = tempfile::tempdir().unwrap();
        for dir in ["a/v1", "a/.publishing-x1", ".deleted-b-5/v1", "c"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        remove_leftovers(root.path());
        let mut left: Vec<String> = walk(root.path());
        left.sort();
        assert_eq!(left, ["a", "a/v1", "c"]);
    }

    fn walk(root: &Path) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(root).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            found.push(name.clone());
            if path.is_dir() {
                found.extend(walk(&path).into_iter().map(|n| format!("{name}/{n}")));
            }
        }
        found
    }

    #[test]
    fn a_version_folder_appears_whole() {
        let root = tempfile::tempdir().unwrap();
        let dims = ModelDims {
            n_layer: 2,
            hidden: 8,
            n_head: 2,
            n_kv_head: 1,
            head_dim: 4,
            ffn: 16,
            qk_rows: adapters::QkRowOrder::GgufInterleaved,
        };
        let adapter = LoraAdapter::new_initialized(Default::default(), dims, 3).unwrap();
        let files = PeftFiles::of(&adapter, "base").unwrap();
        let dir = root.path().join("v1");
        write_version_folder(root.path(), &dir, &files).unwrap();
        assert_eq!(adapters::peft::load(&dir, &dims).unwrap(), adapter);
        let other = LoraAdapter::new_initialized(Default::default(), dims, 4).unwrap();
        write_version_folder(root.path(), &dir, &PeftFiles::of(&other, "base").unwrap()).unwrap();
        assert_eq!(adapters::peft::load(&dir, &dims).unwrap(), other);
        let leftovers: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["v1"]);
    }
}
