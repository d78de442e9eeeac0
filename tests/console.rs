//! The web console in a real browser: tests/browser/console.mjs drives `/console` in Debian's
//! chromium through playwright-core (both installed by `bash tests/setup`): the page loads with no
//! console errors and lists the model, a chat message gets an answer, a job started from the page
//! draws its curves and publishes two versions, and rollback makes version 1 live again. The
//! screenshot is left at `target/console.png`.

mod common;

use std::process::Command;

use common::{workspace_root, Server, ServerOptions};

#[test]
fn the_console_chats_trains_and_rolls_back_in_a_real_browser() {
    let script = workspace_root().join("tests/browser/console.mjs");
    assert!(
        workspace_root()
            .join("tests/browser/node_modules/playwright-core")
            .exists(),
        "playwright-core is missing: run `bash tests/setup` (it installs it and chromium)"
    );
    let server = Server::start(ServerOptions::default());
    let screenshot = workspace_root().join("target/console.png");
    let output = Command::new("node")
        .arg(&script)
        .arg(&server.base)
        .arg(&screenshot)
        .output()
        .expect("run node (bash tests/setup installs what the browser test needs)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        server.log()
    );
    assert_eq!(stdout.matches("ok ").count(), 6, "{stdout}");
    assert!(screenshot.exists(), "the screenshot was written");
}
