//! Peers measured in the same run as our own figures (`--peer PYTHON`): the MeZO paper's
//! reference step in PyTorch + transformers + peft (`peers/mezo_reference.py`) for
//! `mezo bench mezo`, and llama.cpp through llama-cpp-python (`peers/llama_cpp_engine.py`) for
//! `mezo bench engine`. The scripts are built into the binary; the Rust side tokenizes and hands
//! them token ids, so both sides compute on the same tokens of the same GGUF. The peers are
//! large installs and never part of the tests; the README gives the install line.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

/// The reference MeZO step's script.
pub const MEZO_REFERENCE: PeerScript = PeerScript {
    file_name: "mezo_reference.py",
    source: include_str!("peers/mezo_reference.py"),
    install: "python3 -m pip install torch transformers peft gguf numpy",
};

/// llama.cpp's prefill and decode script.
pub const LLAMA_CPP: PeerScript = PeerScript {
    file_name: "llama_cpp_engine.py",
    source: include_str!("peers/llama_cpp_engine.py"),
    install: "python3 -m pip install llama-cpp-python numpy",
};

pub struct PeerScript {
    file_name: &'static str,
    source: &'static str,
    /// What to install when the script's imports fail.
    install: &'static str,
}

/// What the reference MeZO step measured.
#[derive(Debug, Deserialize)]
pub struct MezoReference {
    pub versions: Value,
    pub threads: usize,
    pub forward_seconds: f64,
    pub step_seconds: f64,
    pub peak_rss_bytes: u64,
}

/// What llama.cpp measured.
#[derive(Debug, Deserialize)]
pub struct LlamaCpp {
    pub versions: Value,
    pub threads: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub peak_rss_bytes: u64,
}

/// Runs `script` with `python` on `input` (written as JSON next to it) and parses the JSON on
/// the last line of its output. The script's progress goes to this process's stderr.
pub fn run<T: DeserializeOwned>(
    python: &Path,
    script: &PeerScript,
    input: &Value,
) -> anyhow::Result<T> {
    let dir = tempfile::tempdir().context("cannot create a folder for the peer's script")?;
    let script_path = dir.path().join(script.file_name);
    let input_path = dir.path().join("input.json");
    std::fs::write(&script_path, script.source)?;
    std::fs::write(&input_path, serde_json::to_vec(input)?)?;
    eprintln!(
        "running the peer: {} {} …",
        python.display(),
        script.file_name
    );
    let output = Command::new(python)
        .arg(&script_path)
        .arg(&input_path)
        // transformers draws a progress bar per tensor while it dequantizes the GGUF.
        .env("TQDM_DISABLE", "1")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| {
            format!(
                "cannot run {}; pass --peer the Python that has the peer installed ({})",
                python.display(),
                script.install
            )
        })?;
    if !output.status.success() {
        anyhow::bail!(
            "the peer script {} failed ({}); if an import failed, install it with `{}`",
            script.file_name,
            output.status,
            script.install
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| {
        format!(
            "the peer script {} printed no result line: {last:?}",
            script.file_name
        )
    })
}

/// The thread count both sides use: the process's.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `theirs / ours` for a time, as a speed-up of ours: above 1 means we are faster.
pub fn speedup(ours_seconds: f64, theirs_seconds: f64) -> f64 {
    theirs_seconds / ours_seconds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Echo {
        doubled: u64,
    }

    const DOUBLER: PeerScript = PeerScript {
        file_name: "doubler.py",
        source: "import json, sys\nprint('progress', file=sys.stderr)\nprint('noise')\n\
                 print(json.dumps({'doubled': 2 * json.load(open(sys.argv[1]))['n']}))\n",
        install: "nothing",
    };

    const FAILING: PeerScript = PeerScript {
        file_name: "failing.py",
        source: "import a_module_nobody_installed\n",
        install: "python3 -m pip install a_module_nobody_installed",
    };

    #[test]
    fn a_peer_reads_its_input_and_answers_on_its_last_line() {
        let echo: Echo = run(
            Path::new("python3"),
            &DOUBLER,
            &serde_json::json!({"n": 21}),
        )
        .expect("the script runs");
        assert_eq!(echo, Echo { doubled: 42 });
    }

    #[test]
    fn a_failing_peer_says_what_to_install() {
        let err = run::<Echo>(Path::new("python3"), &FAILING, &serde_json::json!({}))
            .expect_err("the import fails");
        assert!(
            err.to_string()
                .contains("install it with `python3 -m pip install a_module_nobody_installed`"),
            "{err}"
        );
        let err = run::<Echo>(
            Path::new("/no/such/python"),
            &DOUBLER,
            &serde_json::json!({}),
        )
        .expect_err("no interpreter");
        assert!(
            format!("{err:#}").contains("pass --peer the Python"),
            "{err:#}"
        );
    }
}
