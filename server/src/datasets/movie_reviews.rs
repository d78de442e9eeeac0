//! The project's SST-2-like sentiment task (DESIGN.md §3): 10,605 movie-review snippets with
//! mean human ratings in [-4, 4], shipped inside the `vaderSentiment==3.3.2` sdist. Ratings ≥ 1
//! are positive, ≤ -1 negative, the rest dropped. Fetched once into the data folder; a fixed
//! seeded shuffle gives the same train/test split everywhere.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::fetch::{pip_download, run_python, FetchError};

pub const FILE_NAME: &str = "movieReviewSnippets_GroundTruth.txt";
const REQUIREMENT: &str = "vaderSentiment==3.3.2";
const OUTER_MEMBER: &str = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz";
const INNER_MEMBER: &str = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt";

/// The prompt of the benchmark task, and its two candidate completions.
pub const PROMPT_TEMPLATE: &str = "Review: {text}\nSentiment:";
pub const CANDIDATES: [&str; 2] = [" negative", " positive"];

/// One labelled snippet.
#[derive(Debug, Clone, PartialEq)]
pub struct Review {
    pub text: String,
    pub positive: bool,
}

impl Review {
    pub fn prompt(&self) -> String {
        PROMPT_TEMPLATE.replace("{text}", &self.text)
    }

    /// Index into [`CANDIDATES`] of the right answer.
    pub fn label(&self) -> usize {
        usize::from(self.positive)
    }
}

/// Makes sure the ground-truth file is in `dir`, downloading the sdist if needed.
pub fn fetch(dir: &Path, progress: &mut dyn Write) -> Result<PathBuf, FetchError> {
    let dest = dir.join(FILE_NAME);
    if dest.exists() {
        return Ok(dest);
    }
    let io = |context, path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::Io {
            context,
            path,
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    let work = tempfile::tempdir_in(dir).map_err(io("cannot create a folder in", dir))?;
    let _ = writeln!(
        progress,
        "downloading the {REQUIREMENT} source package from PyPI …"
    );
    pip_download(REQUIREMENT, true, work.path())?;
    let sdist = work.path().join("vaderSentiment-3.3.2.tar.gz");
    let extracted = work.path().join(FILE_NAME);
    const SCRIPT: &str = "import shutil, sys, tarfile\n\
        with tarfile.open(sys.argv[1]) as outer:\n    \
        inner = tarfile.open(fileobj=outer.extractfile(sys.argv[2]))\n    \
        with inner.extractfile(sys.argv[3]) as src, open(sys.argv[4], 'wb') as dst:\n        \
        shutil.copyfileobj(src, dst)\n";
    run_python(
        SCRIPT,
        &[
            &sdist,
            Path::new(OUTER_MEMBER),
            Path::new(INNER_MEMBER),
            &extracted,
        ],
    )
    .map_err(|detail| FetchError::MissingMember {
        member: format!("{OUTER_MEMBER} → {INNER_MEMBER}"),
        requirement: REQUIREMENT.to_string(),
        detail,
    })?;
    std::fs::rename(&extracted, &dest).map_err(io("cannot move the data to", &dest))?;
    let _ = writeln!(progress, "data ready: {}", dest.display());
    Ok(dest)
}

/// Parses the ground-truth file: `id \t rating \t text` lines (CRLF), neutral ratings dropped.
pub fn parse(text: &str) -> Vec<Review> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.trim_end_matches('\r').splitn(3, '\t');
            let (_id, rating, text) = (fields.next()?, fields.next()?, fields.next()?);
            let rating: f32 = rating.trim().parse().ok()?;
            let text = text.trim();
            if text.is_empty() {
                return None;
            }
            let positive = if rating >= 1.0 {
                true
            } else if rating <= -1.0 {
                false
            } else {
                return None;
            };
            Some(Review {
                text: text.to_string(),
                positive,
            })
        })
        .collect()
}

/// A fixed split: the reviews shuffled with `seed`, the first `n_train` for training, the next
/// `n_test` held out.
pub fn split(
    mut reviews: Vec<Review>,
    seed: u64,
    n_train: usize,
    n_test: usize,
) -> (Vec<Review>, Vec<Review>) {
    reviews.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let test = reviews.iter().skip(n_train).take(n_test).cloned().collect();
    reviews.truncate(n_train);
    (reviews, test)
}

/// Fetches (if needed) and parses the data set from `dir`.
pub fn load(dir: &Path, progress: &mut dyn Write) -> Result<Vec<Review>, FetchError> {
    let path = fetch(dir, progress)?;
    let text = std::fs::read_to_string(&path).map_err(|source| FetchError::Io {
        context: "cannot read",
        path,
        source,
    })?;
    Ok(parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_labels_by_rating_and_drops_neutral_lines() {
        let text =
            "1\t2.27\tGreat fun .\r\n2\t-0.6\tTepid biopic\r\n3\t-1.5\tA mess .\r\nbad line\r\n";
        let reviews = parse(text);
        assert_eq!(
            reviews,
            vec![
                Review {
                    text: "Great fun .".into(),
                    positive: true
                },
                Review {
                    text: "A mess .".into(),
                    positive: false
                },
            ]
        );
        assert_eq!(reviews[0].prompt(), "Review: Great fun .\nSentiment:");
        assert_eq!(CANDIDATES[reviews[0].label()], " positive");
    }

    #[test]
    fn split_is_deterministic_and_disjoint() {
        let reviews: Vec<Review> = (0..100)
            .map(|i| Review {
                text: format!("r{i}"),
                positive: i % 2 == 0,
            })
            .collect();
        let (train, test) = split(reviews.clone(), 5, 60, 30);
        assert_eq!((train.len(), test.len()), (60, 30));
        assert_eq!(split(reviews, 5, 60, 30), (train.clone(), test.clone()));
        assert!(test.iter().all(|t| !train.contains(t)));
    }
}
