//! The registry of published adapter versions: which versions each adapter name has, and which
//! one is live.
//!
//! Every published state of an adapter is an immutable [`AdapterVersion`]; a name points to its
//! live version. Reading (resolving a request's `model`) is one atomic pointer load and never
//! takes a lock, so serving never waits on a publish. Writers (start-up loading, publishing)
//! build a new map and swap it in; a request that already resolved a version holds an `Arc` to
//! it and finishes on that version whatever is published meanwhile.
//!
//! The payload `T` is whatever the engine needs to run a version (its prepared tensors); this
//! crate does not know engines.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

/// One published, immutable state of an adapter.
#[derive(Debug)]
pub struct AdapterVersion<T> {
    pub name: String,
    /// 1, 2, 3, … in publishing order.
    pub version: u32,
    /// Unix seconds.
    pub created: u64,
    pub payload: T,
}

/// All versions of one adapter name and which one is live.
#[derive(Debug)]
struct AdapterEntry<T> {
    versions: BTreeMap<u32, Arc<AdapterVersion<T>>>,
    live: u32,
}

impl<T> Clone for AdapterEntry<T> {
    fn clone(&self) -> Self {
        Self {
            versions: self.versions.clone(),
            live: self.live,
        }
    }
}

/// What a listing shows of one adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    pub name: String,
    pub live: u32,
    pub versions: Vec<u32>,
    /// Unix seconds when the first version was published.
    pub created: u64,
}

/// Why a `model` string did not resolve to an adapter version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("no adapter named `{0}`")]
    UnknownAdapter(String),
    #[error("adapter `{name}` has no version {version}; it has versions {available}")]
    UnknownVersion {
        name: String,
        version: u32,
        available: String,
    },
    #[error("`{0}` is not a valid version; write `name@N` with N a version number (1, 2, …)")]
    BadVersion(String),
}

type AdapterMap<T> = BTreeMap<String, AdapterEntry<T>>;

pub struct AdapterRegistry<T> {
    adapters: ArcSwap<AdapterMap<T>>,
    /// Serialises writers so two publishes never race on their read-modify-swap.
    writer: Mutex<()>,
}

impl<T> Default for AdapterRegistry<T> {
    fn default() -> Self {
        Self {
            adapters: ArcSwap::from_pointee(BTreeMap::new()),
            writer: Mutex::new(()),
        }
    }
}

impl<T> std::fmt::Debug for AdapterRegistry<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterRegistry")
            .field("adapters", &self.adapters.load().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<T> AdapterRegistry<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves `name` (the live version) or `name@N` (a pinned version). Lock-free.
    pub fn resolve(&self, model: &str) -> Result<Arc<AdapterVersion<T>>, ResolveError> {
        let (name, pinned) = match model.rsplit_once('@') {
            Some((name, version)) => {
                let version: u32 = version
                    .parse()
                    .ok()
                    .filter(|&v| v > 0)
                    .ok_or_else(|| ResolveError::BadVersion(model.to_string()))?;
                (name, Some(version))
            }
            None => (model, None),
        };
        let adapters = self.adapters.load();
        let entry = adapters
            .get(name)
            .ok_or_else(|| ResolveError::UnknownAdapter(name.to_string()))?;
        let version = pinned.unwrap_or(entry.live);
        entry.versions.get(&version).cloned().ok_or_else(|| {
            let available: Vec<String> = entry.versions.keys().map(u32::to_string).collect();
            ResolveError::UnknownVersion {
                name: name.to_string(),
                version,
                available: available.join(", "),
            }
        })
    }

    /// Adds `version` of `name` (as found on disk at start-up). The highest version of a name
    /// becomes live.
    pub fn insert(&self, name: &str, version: u32, created: u64, payload: T) {
        self.update(|adapters| {
            let entry = adapters
                .entry(name.to_string())
                .or_insert_with(|| AdapterEntry {
                    versions: BTreeMap::new(),
                    live: version,
                });
            entry.versions.insert(
                version,
                Arc::new(AdapterVersion {
                    name: name.to_string(),
                    version,
                    created,
                    payload,
                }),
            );
            entry.live = entry.live.max(version);
        });
    }

    /// Publishes `payload` as the next version of `name` (creating the name) and makes it live.
    pub fn publish(&self, name: &str, payload: T) -> Arc<AdapterVersion<T>> {
        let mut published = None;
        self.update(|adapters| {
            let entry = adapters
                .entry(name.to_string())
                .or_insert_with(|| AdapterEntry {
                    versions: BTreeMap::new(),
                    live: 0,
                });
            let version = entry.versions.keys().next_back().map_or(1, |v| v + 1);
            let created = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let new = Arc::new(AdapterVersion {
                name: name.to_string(),
                version,
                created,
                payload,
            });
            entry.versions.insert(version, Arc::clone(&new));
            entry.live = version;
            published = Some(new);
        });
        published.expect("update runs its closure exactly once")
    }

    /// Every adapter name with its versions, in name order.
    pub fn list(&self) -> Vec<AdapterSummary> {
        self.adapters
            .load()
            .iter()
            .map(|(name, entry)| AdapterSummary {
                name: name.clone(),
                live: entry.live,
                versions: entry.versions.keys().copied().collect(),
                created: entry
                    .versions
                    .values()
                    .map(|v| v.created)
                    .min()
                    .unwrap_or(0),
            })
            .collect()
    }

    /// Whether an adapter with this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.adapters.load().contains_key(name)
    }

    /// The versions of `name`, oldest first, and which one is live; `None` for an unknown name.
    pub fn versions(&self, name: &str) -> Option<(Vec<Arc<AdapterVersion<T>>>, u32)> {
        let adapters = self.adapters.load();
        let entry = adapters.get(name)?;
        Some((entry.versions.values().cloned().collect(), entry.live))
    }

    /// Makes an existing version of `name` live (a rollback, or a roll forward).
    pub fn set_live(&self, name: &str, version: u32) -> Result<(), ResolveError> {
        let mut outcome = Ok(());
        self.update(|adapters| match adapters.get_mut(name) {
            None => outcome = Err(ResolveError::UnknownAdapter(name.to_string())),
            Some(entry) if !entry.versions.contains_key(&version) => {
                let available: Vec<String> = entry.versions.keys().map(u32::to_string).collect();
                outcome = Err(ResolveError::UnknownVersion {
                    name: name.to_string(),
                    version,
                    available: available.join(", "),
                });
            }
            Some(entry) => entry.live = version,
        });
        outcome
    }

    /// Removes `name` and all its versions; requests holding a version finish on it. Returns
    /// whether the name existed.
    pub fn remove(&self, name: &str) -> bool {
        let mut existed = false;
        self.update(|adapters| existed = adapters.remove(name).is_some());
        existed
    }

    fn update(&self, change: impl FnOnce(&mut AdapterMap<T>)) {
        // A poisoned lock only means another writer panicked; the map it guards is the
        // ArcSwap's, which is always whole, so writing on is safe.
        let _writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next: AdapterMap<T> = (**self.adapters.load()).clone();
        change(&mut next);
        self.adapters.store(Arc::new(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_live_and_pinned_versions() {
        let registry = AdapterRegistry::new();
        registry.insert("sentiment", 1, 10, "one");
        registry.insert("sentiment", 3, 30, "three");
        assert_eq!(registry.resolve("sentiment").unwrap().payload, "three");
        assert_eq!(registry.resolve("sentiment@1").unwrap().payload, "one");
        assert_eq!(
            registry.resolve("sentiment@2").unwrap_err(),
            ResolveError::UnknownVersion {
                name: "sentiment".into(),
                version: 2,
                available: "1, 3".into()
            }
        );
        assert_eq!(
            registry.resolve("other").unwrap_err(),
            ResolveError::UnknownAdapter("other".into())
        );
        for bad in ["sentiment@0", "sentiment@x", "sentiment@"] {
            assert_eq!(
                registry.resolve(bad).unwrap_err(),
                ResolveError::BadVersion(bad.into())
            );
        }
    }

    #[test]
    fn a_resolved_version_survives_a_publish() {
        let registry = AdapterRegistry::new();
        let first = registry.publish("a", vec![1.0_f32]);
        assert_eq!(first.version, 1);
        let held = registry.resolve("a").unwrap();
        let second = registry.publish("a", vec![2.0]);
        assert_eq!(second.version, 2);
        assert_eq!(held.payload, vec![1.0]);
        assert_eq!(registry.resolve("a").unwrap().payload, vec![2.0]);
        assert_eq!(
            registry.list(),
            vec![AdapterSummary {
                name: "a".into(),
                live: 2,
                versions: vec![1, 2],
                created: first.created,
            }]
        );
    }

    #[test]
    fn set_live_rolls_back_and_remove_forgets() {
        let registry = AdapterRegistry::new();
        registry.insert("a", 1, 0, "one");
        registry.insert("a", 2, 0, "two");
        registry.set_live("a", 1).unwrap();
        assert_eq!(registry.resolve("a").unwrap().payload, "one");
        assert_eq!(registry.resolve("a@2").unwrap().payload, "two");
        assert!(matches!(
            registry.set_live("a", 9),
            Err(ResolveError::UnknownVersion { version: 9, .. })
        ));
        assert_eq!(
            registry.set_live("b", 1),
            Err(ResolveError::UnknownAdapter("b".into()))
        );
        let (versions, live) = registry.versions("a").unwrap();
        assert_eq!((versions.len(), live), (2, 1));
        let held = registry.resolve("a").unwrap();
        assert!(registry.remove("a"));
        assert!(!registry.remove("a"));
        assert!(registry.resolve("a").is_err());
        assert_eq!(held.payload, "one");
    }
}
