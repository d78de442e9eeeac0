//! The query of a listing: `?after=<id>&limit=<n>`, and whole-number query parameters.

use std::collections::HashMap;

use crate::api::error::ApiError;

/// Default and largest page of a listing.
pub const DEFAULT_PAGE: usize = 20;
pub const MAX_PAGE: usize = 1000;

/// `?after=<id>&limit=<n>` of a listing.
pub fn page(query: &HashMap<String, String>) -> Result<(Option<String>, usize), ApiError> {
    Ok((query.get("after").cloned(), limit(query, DEFAULT_PAGE)?))
}

/// `?limit=<n>`, 1 to [`MAX_PAGE`]; `default` when absent.
pub fn limit(query: &HashMap<String, String>, default: usize) -> Result<usize, ApiError> {
    let limit = number(query, "limit")?.map_or(default, |n| n as usize);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid(
            "limit",
            format!("`limit` must be between 1 and {MAX_PAGE}"),
        ));
    }
    Ok(limit)
}

/// A yes/no query parameter: `true`/`1` or `false`/`0`; `false` when absent.
pub fn flag(query: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match query.get(name).map(String::as_str) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(other) => Err(ApiError::invalid(
            name,
            format!("`{name}` must be true or false, not {other:?}"),
        )),
    }
}

/// A numeric query parameter.
pub fn number(query: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    query
        .get(name)
        .map(|v| {
            v.parse().map_err(|_| {
                ApiError::invalid(name, format!("`{name}` must be a whole number, not {v:?}"))
            })
        })
        .transpose()
}
