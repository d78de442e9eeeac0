//! `GET /` and `GET /console`: the web console, one HTML page (`server/src/console/index.html`)
//! embedded in the binary. It calls the public API from the browser with the key the user
//! enters (kept in the tab's session storage), so it is open like the probes and holds nothing
//! secret itself.

use axum::response::Html;

use super::error::ErrorBody;

const PAGE: &str = include_str!("../console/index.html");

#[utoipa::path(
    get,
    path = "/",
    tag = "console",
    summary = "The web console",
    responses(
        (status = 200, description = "The console's page", content_type = "text/html", body = String),
        (status = "default", description = "An error in OpenAI's shape", body = ErrorBody),
    )
)]
pub async fn root() -> Html<&'static str> {
    Html(PAGE)
}

#[utoipa::path(
    get,
    path = "/console",
    tag = "console",
    summary = "The web console (the same page as `/`)",
    responses(
        (status = 200, description = "The console's page", content_type = "text/html", body = String),
        (status = "default", description = "An error in OpenAI's shape", body = ErrorBody),
    )
)]
pub async fn console() -> Html<&'static str> {
    Html(PAGE)
}
