//! The query of a listing: `?after=<id>&limit=<n>`, and whole-number query parameters.

use std::collections::HashMap;

use crate::api::error::ApiError;

/// Default and largest page of a listing.
pub const DEFAULT_PAGE: usize = 20;
pub const MAX_PAGE: usize = 1000;

/// `?after=<id>&limit=<n>` of a listing.
pub fn page(query: &HashMap<String, String>) -> Result<(Option<String>, usize), ApiError> {
    let limit = number(query, "limit")?.map_or(DEFAULT_PAGE, |n| n as usize);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid(
            "limit",
            format!("`limit` must be between 1 and {MAX_PAGE}"),
        ));
    }
    Ok((query.get("after").cloned(), limit))
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
