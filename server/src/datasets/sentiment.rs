//! The project's sentiment tasks: snippets with mean human ratings in [-4, 4], shipped inside the
//! `vaderSentiment==3.3.2` sdist (Hutto & Gilbert, ICWSM 2014). Ratings ≥ 1 are positive, ≤ -1
//! negative, the rest dropped. Two tasks:
//! - the movie reviews: 10,605 snippets, 6,899 kept, SST-2-like; the task the
//!   defaults were measured on;
//! - the New York Times editorial snippets: 5,190, of which 1,554 kept (558 positive), sentences
//!   of opinion pieces, a second task the defaults are not tuned on.
//!
//! Each file is fetched once into the data folder; a fixed seeded shuffle gives the same
//! train/test split everywhere.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::fetch::{pip_download, run_python, FetchError};

const REQUIREMENT: &str = "vaderSentiment==3.3.2";
const OUTER_MEMBER: &str = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz";

/// The two candidate completions of every task: index 1 is the positive one.
pub const CANDIDATES: [&str; 2] = [" negative", " positive"];

/// One of the sentiment tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SentimentTask {
    MovieReviews,
    NytEditorials,
}

impl SentimentTask {
    /// The ground-truth file, in the data folder and in the sdist's inner archive.
    pub fn file_name(self) -> &'static str {
        match self {
            SentimentTask::MovieReviews => "movieReviewSnippets_GroundTruth.txt",
            SentimentTask::NytEditorials => "nytEditorialSnippets_GroundTruth.txt",
        }
    }

    /// The task's prompt, `{text}` standing for the snippet.
    pub fn prompt_template(self) -> &'static str {
        match self {
            SentimentTask::MovieReviews => "Review: {text}\nSentiment:",
            SentimentTask::NytEditorials => {
                "Sentence from a newspaper editorial: {text}\nIts sentiment:"
            }
        }
    }

    /// What the task's snippets are, for reports.
    pub fn description(self) -> &'static str {
        match self {
            SentimentTask::MovieReviews => "movie-review sentiment",
            SentimentTask::NytEditorials => "New York Times editorial sentiment",
        }
    }
}

/// One labelled snippet of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Snippet {
    pub task: SentimentTask,
    pub text: String,
    pub positive: bool,
}

impl Snippet {
    pub fn prompt(&self) -> String {
        self.task.prompt_template().replace("{text}", &self.text)
    }

    /// Index into [`CANDIDATES`] of the right answer.
    pub fn label(&self) -> usize {
        usize::from(self.positive)
    }
}

/// Makes sure the task's ground-truth file is in `dir`, downloading the sdist if needed.
pub fn fetch(
    task: SentimentTask,
    dir: &Path,
    progress: &mut dyn Write,
) -> Result<PathBuf, FetchError> {
    let dest = dir.join(task.file_name());
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
    let extracted = work.path().join(task.file_name());
    let inner_member = format!("hutto_ICWSM_2014/{}", task.file_name());
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
            Path::new(&inner_member),
            &extracted,
        ],
    )
    .map_err(|detail| FetchError::MissingMember {
        member: format!("{OUTER_MEMBER} → {inner_member}"),
        requirement: REQUIREMENT.to_string(),
        detail,
    })?;
    std::fs::rename(&extracted, &dest).map_err(io("cannot move the data to", &dest))?;
    let _ = writeln!(progress, "data ready: {}", dest.display());
    Ok(dest)
}

/// Parses a ground-truth file of `task`: `id \t rating \t text` lines (CRLF), neutral ratings
/// dropped.
pub fn parse(task: SentimentTask, text: &str) -> Vec<Snippet> {
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
            Some(Snippet {
                task,
                text: text.to_string(),
                positive,
            })
        })
        .collect()
}

/// A fixed split: the reviews shuffled with `seed`, the first `n_train` for training, the next
/// `n_test` held out.
pub fn split(
    mut reviews: Vec<Snippet>,
    seed: u64,
    n_train: usize,
    n_test: usize,
) -> (Vec<Snippet>, Vec<Snippet>) {
    reviews.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let test = reviews.iter().skip(n_train).take(n_test).cloned().collect();
    reviews.truncate(n_train);
    (reviews, test)
}

/// Fetches (if needed) and parses the task's data set from `dir`.
pub fn load(
    task: SentimentTask,
    dir: &Path,
    progress: &mut dyn Write,
) -> Result<Vec<Snippet>, FetchError> {
    let path = fetch(task, dir, progress)?;
    let text = std::fs::read_to_string(&path).map_err(|source| FetchError::Io {
        context: "cannot read",
        path,
        source,
    })?;
    Ok(parse(task, &text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_labels_by_rating_and_drops_neutral_lines() {
        let text =
            "1\t2.27\tGreat fun .\r\n2\t-0.6\tTepid biopic\r\n3\t-1.5\tA mess .\r\nbad line\r\n";
        let reviews = parse(SentimentTask::MovieReviews, text);
        assert_eq!(
            reviews,
            vec![
                Snippet {
                    task: SentimentTask::MovieReviews,
                    text: "Great fun .".into(),
                    positive: true
                },
                Snippet {
                    task: SentimentTask::MovieReviews,
                    text: "A mess .".into(),
                    positive: false
                },
            ]
        );
        assert_eq!(reviews[0].prompt(), "Review: Great fun .\nSentiment:");
        let editorial = parse(SentimentTask::NytEditorials, "1_3\t1.5\tA fine idea.\r\n");
        assert_eq!(
            editorial[0].prompt(),
            "Sentence from a newspaper editorial: A fine idea.\nIts sentiment:"
        );
        assert_eq!(CANDIDATES[reviews[0].label()], " positive");
    }

    #[test]
    fn split_is_deterministic_and_disjoint() {
        let reviews: Vec<Snippet> = (0..100)
            .map(|i| Snippet {
                task: SentimentTask::MovieReviews,
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
