//! Who may call what: API keys and their scopes.
//!
//! A key from `server.api_keys` (or `MEZO_API_KEYS`) may do everything. A `[[server.keys]]`
//! entry may do what its `scopes` list:
//! - `inference`: chat and text completions, the model list, feedback on answers;
//! - `fine_tuning`: jobs (both APIs), files, reading adapters and their feedback;
//! - `admin`: everything, including rollback, delete, continuous training and loading or
//!   unloading adapters at runtime.
//!
//! [`required_scope`] is the one table from routes to scopes; a route it does not know needs
//! `admin`, so a route added without a row here is closed rather than open.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::Method;
use serde::Deserialize;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Inference,
    FineTuning,
    Admin,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Inference => "inference",
            Scope::FineTuning => "fine_tuning",
            Scope::Admin => "admin",
        })
    }
}

/// One `[[server.keys]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopedKey {
    /// The secret, sent as `Authorization: Bearer <key>`.
    pub key: String,
    pub scopes: BTreeSet<Scope>,
    /// A name for the log (the key itself is never logged).
    #[serde(default)]
    pub name: String,
    /// Most requests of this key in flight at once (a stream counts until it ends); unset:
    /// `server.max_concurrent_requests_per_key`; 0: no cap.
    #[serde(default)]
    pub max_concurrent_requests: Option<usize>,
    /// Most fine-tuning jobs of this key queued or running at once; unset:
    /// `server.max_queued_jobs_per_key`; 0: no cap.
    #[serde(default)]
    pub max_queued_jobs: Option<usize>,
}

/// What a key may hold at once, where its entry does not say (0: no cap).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub max_concurrent_requests: usize,
    pub max_queued_jobs: usize,
}

/// The key a request came with, for handlers that account work to it (its jobs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerKey {
    pub name: String,
    /// Most of its fine-tuning jobs queued or running at once; 0: no cap.
    pub max_queued_jobs: usize,
}

/// A key the server accepts, as requests meet it: what it may do and how much of it at once.
#[derive(Debug)]
pub struct ApiKey {
    secret: String,
    /// For the log and messages; never the secret.
    pub name: String,
    pub scopes: BTreeSet<Scope>,
    /// Most requests in flight at once; 0: no cap.
    pub max_concurrent_requests: usize,
    /// Most fine-tuning jobs queued or running at once; 0: no cap.
    pub max_queued_jobs: usize,
    in_flight: Arc<AtomicUsize>,
}

impl ApiKey {
    /// Whether the key may do what `needed` guards (`admin` may do everything).
    pub fn allows(&self, needed: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&needed)
    }

    /// The scopes, for messages: `inference, fine_tuning`.
    pub fn scope_list(&self) -> String {
        let names: Vec<String> = self.scopes.iter().map(Scope::to_string).collect();
        names.join(", ")
    }

    /// Who the request's caller is, for accounting its jobs.
    pub fn caller(&self) -> CallerKey {
        CallerKey {
            name: self.name.clone(),
            max_queued_jobs: self.max_queued_jobs,
        }
    }

    /// A place among the key's requests in flight, or `None` when all are taken.
    pub fn try_start_request(&self) -> Option<RequestSlot> {
        let cap = self.max_concurrent_requests;
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (cap == 0 || n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| RequestSlot(Arc::clone(&self.in_flight)))
    }
}

/// One request in flight for its key; the place is given back when this is dropped.
#[derive(Debug)]
pub struct RequestSlot(Arc<AtomicUsize>);

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every key the server accepts.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: Arc<[ApiKey]>,
}

impl KeyRing {
    /// Plain keys (every scope) and scoped ones; `limits` apply to each key that does not set
    /// its own.
    pub fn new(all_scopes: &[String], scoped: &[ScopedKey], limits: KeyLimits) -> Self {
        let plain = all_scopes.iter().enumerate().map(|(i, secret)| ApiKey {
            secret: secret.clone(),
            name: format!("api_keys[{i}]"),
            scopes: BTreeSet::from([Scope::Admin]),
            max_concurrent_requests: limits.max_concurrent_requests,
            max_queued_jobs: limits.max_queued_jobs,
            in_flight: Arc::default(),
        });
        let scoped = scoped.iter().enumerate().map(|(i, key)| ApiKey {
            secret: key.key.clone(),
            name: if key.name.is_empty() {
                format!("keys[{i}]")
            } else {
                key.name.clone()
            },
            scopes: key.scopes.clone(),
            max_concurrent_requests: key
                .max_concurrent_requests
                .unwrap_or(limits.max_concurrent_requests),
            max_queued_jobs: key.max_queued_jobs.unwrap_or(limits.max_queued_jobs),
            in_flight: Arc::default(),
        });
        Self {
            keys: plain.chain(scoped).collect(),
        }
    }

    /// No keys: the API is open.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key `given` is, if any. Every key is compared, each in time independent of where
    /// it differs, so the answer's timing says nothing about the keys.
    pub fn find(&self, given: &str) -> Option<&ApiKey> {
        self.keys.iter().fold(None, |found, key| {
            let matches = constant_time_eq(&key.secret, given);
            found.or(matches.then_some(key))
        })
    }
}

/// The scope a request to `route` (its template, as the router matched it) with `method`
/// needs; `None` for a path no route matched (any valid key then gets its 404).
pub fn required_scope(method: &Method, route: Option<&str>) -> Option<Scope> {
    let route = route?;
    let scope = match route {
        "/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/v1/models/{*id}" => {
            Scope::Inference
        }
        "/v1/feedback" if method == Method::POST => Scope::Inference,
        "/v1/feedback" => Scope::FineTuning,
        "/v1/adapters" => Scope::FineTuning,
        "/v1/adapters/{name}" if method == Method::GET => Scope::FineTuning,
        _ if route.starts_with("/v1/finetune")
            || route.starts_with("/v1/fine_tuning/")
            || route.starts_with("/v1/files") =>
        {
            Scope::FineTuning
        }
        // Rollback, delete, continuous training, runtime adapter loading, and any route
        // without a row above.
        _ => Scope::Admin,
    };
    Some(scope)
}

/// Compares keys in time independent of where they differ.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq("sk-abc", "sk-abc"));
        assert!(!constant_time_eq("sk-abc", "sk-abd"));
        assert!(!constant_time_eq("sk-abc", "sk-ab"));
    }

    #[test]
    fn routes_need_their_scopes() {
        let cases = [
            (Method::POST, "/v1/chat/completions", Scope::Inference),
            (Method::POST, "/v1/completions", Scope::Inference),
            (Method::GET, "/v1/models", Scope::Inference),
            (Method::GET, "/v1/models/{*id}", Scope::Inference),
            (Method::POST, "/v1/feedback", Scope::Inference),
            (Method::GET, "/v1/feedback", Scope::FineTuning),
            (Method::POST, "/v1/finetune", Scope::FineTuning),
            (Method::POST, "/v1/finetune/{id}/cancel", Scope::FineTuning),
            (
                Method::GET,
                "/v1/fine_tuning/jobs/{id}/events",
                Scope::FineTuning,
            ),
            (Method::POST, "/v1/files", Scope::FineTuning),
            (Method::GET, "/v1/files/{id}/content", Scope::FineTuning),
            (Method::GET, "/v1/adapters", Scope::FineTuning),
            (Method::GET, "/v1/adapters/{name}", Scope::FineTuning),
            (Method::DELETE, "/v1/adapters/{name}", Scope::Admin),
            (Method::POST, "/v1/adapters/{name}/rollback", Scope::Admin),
            (
                Method::PUT,
                "/v1/adapters/{name}/continuous_training",
                Scope::Admin,
            ),
            (Method::POST, "/v1/load_lora_adapter", Scope::Admin),
            (Method::POST, "/v1/unload_lora_adapter", Scope::Admin),
            (Method::POST, "/v1/some_future_route", Scope::Admin),
        ];
        for (method, route, scope) in cases {
            assert_eq!(
                required_scope(&method, Some(route)),
                Some(scope),
                "{method} {route}"
            );
        }
        assert_eq!(required_scope(&Method::GET, None), None);
    }

    fn scoped(key: &str, scopes: &[Scope], name: &str, cap: Option<usize>) -> ScopedKey {
        ScopedKey {
            key: key.into(),
            scopes: scopes.iter().copied().collect(),
            name: name.into(),
            max_concurrent_requests: cap,
            max_queued_jobs: None,
        }
    }

    #[test]
    fn plain_keys_do_everything_and_scoped_keys_what_they_list() {
        let ring = KeyRing::new(
            &["sk-all".into()],
            &[
                scoped("sk-app", &[Scope::Inference], "web app", None),
                scoped("sk-ops", &[Scope::Admin], "", None),
            ],
            KeyLimits::default(),
        );
        let every_scope = [Scope::Inference, Scope::FineTuning, Scope::Admin];
        let all = ring.find("sk-all").expect("a plain key");
        assert!(every_scope.iter().all(|&s| all.allows(s)));
        let app = ring.find("sk-app").expect("a scoped key");
        assert_eq!(app.name, "web app");
        assert!(app.allows(Scope::Inference));
        assert!(!app.allows(Scope::FineTuning) && !app.allows(Scope::Admin));
        let ops = ring.find("sk-ops").expect("an admin key");
        assert_eq!(ops.name, "keys[1]");
        assert!(every_scope.iter().all(|&s| ops.allows(s)));
        assert!(ring.find("sk-none").is_none());
        assert!(ring.find("").is_none());
        assert!(KeyRing::new(&[], &[], KeyLimits::default()).is_empty());
    }

    #[test]
    fn each_key_has_its_own_cap_on_requests_in_flight() {
        let ring = KeyRing::new(
            &["sk-all".into()],
            &[
                scoped("sk-one", &[Scope::Inference], "", Some(1)),
                scoped("sk-free", &[Scope::Inference], "", Some(0)),
            ],
            KeyLimits {
                max_concurrent_requests: 2,
                max_queued_jobs: 3,
            },
        );
        let all = ring.find("sk-all").expect("key");
        assert_eq!(all.caller().max_queued_jobs, 3);
        let held: Vec<RequestSlot> = (0..2)
            .map(|_| all.try_start_request().expect("a slot"))
            .collect();
        assert!(all.try_start_request().is_none(), "the default cap is 2");
        let one = ring.find("sk-one").expect("key");
        let first = one.try_start_request().expect("a slot");
        assert!(one.try_start_request().is_none(), "its own cap is 1");
        drop(first);
        assert!(
            one.try_start_request().is_some(),
            "a finished request gives its place back"
        );
        drop(held);
        assert!(all.try_start_request().is_some());
        let free = ring.find("sk-free").expect("key");
        let many: Vec<RequestSlot> = (0..100)
            .map(|_| free.try_start_request().expect("no cap"))
            .collect();
        assert_eq!(many.len(), 100);
    }
}
