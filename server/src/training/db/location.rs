//! Where the fine-tuning database lives, as `--database` / `[data] database` /
//! `MEZO_DATABASE` give it: `sqlite:<path>` or `postgres://…` (`postgresql://…`).

use std::fmt;
use std::path::PathBuf;

use super::DbError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// A SQLite file, created if missing.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL, as `libpq` reads it.
    Postgres(String),
}

impl DatabaseUrl {
    pub fn parse(given: &str) -> Result<Self, DbError> {
        let given = given.trim();
        if given.starts_with("postgres://") || given.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(given.to_string()));
        }
        match given.strip_prefix("sqlite:") {
            Some(path) if !path.is_empty() => {
                // `sqlite:///abs/path` and `sqlite://rel` are common spellings of the same.
                let path = path.strip_prefix("//").unwrap_or(path);
                Ok(DatabaseUrl::Sqlite(PathBuf::from(path)))
            }
            _ => Err(DbError::UnknownScheme {
                given: redact_password(given),
            }),
        }
    }
}

impl fmt::Display for DatabaseUrl {
    /// The URL with its password hidden, for logs and errors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            DatabaseUrl::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

/// `scheme://user:password@host…` as `scheme://user:***@host…`; anything else unchanged but
/// for a `password=` parameter, whose value is hidden too.
pub fn redact_password(url: &str) -> String {
    let mut shown = url.to_string();
    if let Some(scheme_end) = shown.find("://") {
        let authority_start = scheme_end + 3;
        let authority_end = shown[authority_start..]
            .find('/')
            .map_or(shown.len(), |i| authority_start + i);
        if let Some(at) = shown[authority_start..authority_end].rfind('@') {
            let user_info = authority_start..authority_start + at;
            if let Some(colon) = shown[user_info.clone()].find(':') {
                shown.replace_range(user_info.start + colon + 1..user_info.end, "***");
            }
        }
    }
    if let Some(start) = shown.find("password=") {
        let value_start = start + "password=".len();
        let value_end = shown[value_start..]
            .find('&')
            .map_or(shown.len(), |i| value_start + i);
        shown.replace_range(value_start..value_end, "***");
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_schemes_parse_and_others_are_refused_with_the_choices() {
        assert_eq!(
            DatabaseUrl::parse("sqlite:data/mezo.sqlite").unwrap(),
            DatabaseUrl::Sqlite("data/mezo.sqlite".into())
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite:///var/lib/mezo.sqlite").unwrap(),
            DatabaseUrl::Sqlite("/var/lib/mezo.sqlite".into())
        );
        assert!(matches!(
            DatabaseUrl::parse("postgresql://u@h/db").unwrap(),
            DatabaseUrl::Postgres(_)
        ));
        for bad in ["mysql://u:secret@h/db", "sqlite:", "mezo.sqlite", ""] {
            let err = DatabaseUrl::parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("sqlite:<path>") && err.contains("postgres://"),
                "{err}"
            );
            assert!(!err.contains("secret"), "{err}");
        }
    }

    #[test]
    fn passwords_never_show() {
        let url = DatabaseUrl::parse("postgres://mezo:s3cr@t@db.local:5432/mezo").unwrap();
        assert_eq!(url.to_string(), "postgres://mezo:***@db.local:5432/mezo");
        assert_eq!(
            redact_password("postgres://db.local/mezo?user=m&password=s3cret&sslmode=disable"),
            "postgres://db.local/mezo?user=m&password=***&sslmode=disable"
        );
        assert_eq!(
            redact_password("postgres://mezo@db.local/mezo"),
            "postgres://mezo@db.local/mezo"
        );
    }
}
