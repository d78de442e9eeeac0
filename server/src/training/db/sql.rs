//! The SQL the storage code speaks, whichever database runs it: parameters and columns as
//! [`Value`]s, a [`SqlConnection`] that runs a statement inside the current transaction, and
//! the few places where SQLite and PostgreSQL disagree ([`Dialect`]).
//!
//! Statements are written once, with SQLite's numbered placeholders (`?1`, `?2`, …), and use
//! only what both databases accept: `INSERT … ON CONFLICT … DO UPDATE`, integers as 64-bit
//! (`BIGINT` in PostgreSQL's schema), booleans stored as 0 or 1, subqueries with an alias.
//! The PostgreSQL backend rewrites the placeholders to `$1`, `$2`, ….

use super::{DbError, DbResult};

/// A parameter or a column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// Which database a statement runs on, for the statements that must differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The column that orders `completions` by insertion: SQLite's implicit `rowid`, a
    /// `BIGSERIAL` in PostgreSQL's schema.
    pub fn completions_insertion_order(self) -> &'static str {
        match self {
            Dialect::Sqlite => "rowid",
            Dialect::Postgres => "seq",
        }
    }
}

/// One connection inside one transaction (see [`super::Db::transaction`]).
pub trait SqlConnection {
    fn dialect(&self) -> Dialect;

    /// Runs a statement; how many rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> DbResult<u64>;

    /// Runs a query; its rows.
    fn query(&mut self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>>;
}

impl dyn SqlConnection + '_ {
    /// The first row of a query, if any.
    pub fn query_opt(&mut self, sql: &str, params: &[Value]) -> DbResult<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The first column of the first row of a query that always returns one (an aggregate).
    pub fn query_value<T: FromValue>(&mut self, sql: &str, params: &[Value]) -> DbResult<T> {
        match self.query_opt(sql, params)? {
            Some(row) => row.get(0),
            None => Err(DbError::Corrupt {
                what: "query result",
                reason: format!("no row from `{sql}`"),
            }),
        }
    }
}

/// A row of a query's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Value>);

impl Row {
    /// Column `index`, converted.
    pub fn get<T: FromValue>(&self, index: usize) -> DbResult<T> {
        let value = self.0.get(index).ok_or_else(|| DbError::Corrupt {
            what: "row",
            reason: format!("no column {index}"),
        })?;
        T::from_value(value).ok_or_else(|| DbError::Corrupt {
            what: "column",
            reason: format!("column {index} holds {value:?}, not {}", T::EXPECTED),
        })
    }
}

/// A Rust value a column converts to.
pub trait FromValue: Sized {
    /// What the column should have held, for the error when it did not.
    const EXPECTED: &'static str;
    fn from_value(value: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    const EXPECTED: &'static str = "an integer";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Int(v) => Some(*v),
            _ => None,
        }
    }
}

macro_rules! from_integer_value {
    ($($ty:ty),*) => {$(
        impl FromValue for $ty {
            const EXPECTED: &'static str = concat!("an integer that fits ", stringify!($ty));
            fn from_value(value: &Value) -> Option<Self> {
                i64::from_value(value).and_then(|v| <$ty>::try_from(v).ok())
            }
        }
    )*};
}
from_integer_value!(u64, u32, usize);

impl FromValue for bool {
    const EXPECTED: &'static str = "0 or 1";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Int(0) => Some(false),
            Value::Int(1) => Some(true),
            _ => None,
        }
    }
}

impl FromValue for f64 {
    const EXPECTED: &'static str = "a number";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Real(v) => Some(*v),
            // SQLite stores a REAL that is a whole number as written; a column's affinity
            // gives it back as REAL, but a bare expression may not.
            Value::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
}

impl FromValue for String {
    const EXPECTED: &'static str = "text";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Text(text) => Some(text.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    const EXPECTED: &'static str = "bytes";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Blob(bytes) => Some(bytes.clone()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    const EXPECTED: &'static str = T::EXPECTED;
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

macro_rules! integer_into_value {
    ($($ty:ty),*) => {$(
        impl From<$ty> for Value {
            /// Saturates at `i64::MAX`: the values stored (times, counts, steps, limits)
            /// never come near it, and a limit beyond it means "no limit" either way.
            fn from(v: $ty) -> Self {
                Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
            }
        }
    )*};
}
integer_into_value!(u64, u32, usize);

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(i64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Real(v)
    }
}

impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::Real(f64::from(v))
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Blob(v.to_vec())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// A statement's parameters: `values![a, b]` is `[Value::from(a), Value::from(b)]`.
macro_rules! values {
    ($($value:expr),* $(,)?) => {
        [$($crate::training::db::sql::Value::from($value)),*]
    };
}
pub(crate) use values;

/// The `VALUES` list of a multi-row insert: `rows` groups of `width` numbered placeholders,
/// `(?1, ?2), (?3, ?4)` for two rows of two.
pub fn row_placeholders(rows: usize, width: usize) -> String {
    let row = |r: usize| {
        let numbered: Vec<String> = (1..=width).map(|c| format!("?{}", r * width + c)).collect();
        format!("({})", numbered.join(", "))
    };
    (0..rows).map(row).collect::<Vec<_>>().join(", ")
}

/// `sql` with SQLite's `?N` placeholders written as PostgreSQL's `$N`. The storage code's
/// statements have no `?` inside a string literal.
pub fn numbered_dollar_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollar_numbers() {
        assert_eq!(
            numbered_dollar_placeholders("UPDATE t SET a = ?2 WHERE id = ?1 AND b IN (?10)"),
            "UPDATE t SET a = $2 WHERE id = $1 AND b IN ($10)"
        );
    }

    #[test]
    fn rows_of_placeholders_number_on() {
        assert_eq!(row_placeholders(2, 2), "(?1, ?2), (?3, ?4)");
        assert_eq!(row_placeholders(1, 3), "(?1, ?2, ?3)");
    }

    #[test]
    fn columns_convert_or_say_what_they_held() {
        let row = Row(vec![Value::Int(-1), Value::Null, Value::Int(1)]);
        assert_eq!(row.get::<i64>(0).unwrap(), -1);
        assert!(row.get::<u64>(0).is_err(), "a negative is no u64");
        assert_eq!(row.get::<Option<String>>(1).unwrap(), None);
        assert!(row.get::<bool>(2).unwrap());
        let err = row.get::<String>(2).unwrap_err().to_string();
        assert!(err.contains("Int(1), not text"), "{err}");
        assert!(row.get::<i64>(3).is_err());
    }

    #[test]
    fn large_unsigned_parameters_saturate() {
        assert_eq!(Value::from(u64::MAX), Value::Int(i64::MAX));
        assert_eq!(Value::from(None::<u32>), Value::Null);
        assert_eq!(Value::from(Some("a")), Value::Text("a".into()));
    }
}
