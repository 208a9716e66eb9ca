//! Statements written once, sent two ways: with bound parameters (sqlx's
//! `QueryBuilder`, the prepared-statement protocol), or as one SQL text with every value
//! written as a literal (PostgreSQL's simple-query protocol).
//!
//! ## Design note: why literals at all
//! A batch transaction's time on PostgreSQL is its round trips, not its fsync (see
//! BENCHMARKS.md, "what a round trip costs"), and sqlx sends one statement per round
//! trip. The simple-query protocol takes several statements in one message, but no
//! parameters: `BEGIN`, the lock and the look-ups go as one message, and the batch's
//! rows with `COMMIT` as another.
//!
//! Literals are safe here because only this module writes them, from typed values:
//! - numbers and booleans are formatted, never copied from text;
//! - UUIDs and times are formatted by their own types;
//! - text (and JSON, which is text) is quoted the SQL standard's way, each `'` doubled.
//!   That is the whole escaping rule while `standard_conforming_strings` is on, which
//!   the PostgreSQL pool sets on every connection (`PgStore::connect`), so a backslash
//!   is an ordinary character;
//! - a NUL cannot be written (PostgreSQL text has none, and the protocol ends the query
//!   at one): a statement with a NUL in a value is not spliced
//!   ([`Literal::spliceable`]), and its caller binds it instead (where the database
//!   rejects it, as it rejects a bound NUL).

use std::borrow::Cow;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use uuid::Uuid;

/// One value of a statement.
pub(super) enum Val<'a> {
    Uuid(Uuid),
    Text(Cow<'a, str>),
    NullableText(Option<&'a str>),
    Bool(bool),
    Int(i64),
    /// Serialized JSON (`jsonb` on PostgreSQL, text on SQLite).
    Json(Box<RawValue>),
    Time(DateTime<Utc>),
}

/// Where a statement is written: SQL text, and values in it.
pub(super) trait Statement<'a> {
    fn sql(&mut self, sql: &str);
    fn value(&mut self, value: Val<'a>);

    /// `VALUES (…), (…)`: one parenthesized list per row.
    fn rows<const N: usize>(&mut self, rows: impl IntoIterator<Item = [Val<'a>; N]>) {
        self.sql("VALUES ");
        for (i, row) in rows.into_iter().enumerate() {
            self.sql(if i == 0 { "(" } else { ", (" });
            for (j, value) in row.into_iter().enumerate() {
                if j > 0 {
                    self.sql(", ");
                }
                self.value(value);
            }
            self.sql(")");
        }
    }
}

impl<'a, DB> Statement<'a> for sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Cow<'a, str>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a str>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    bool: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    sqlx::types::Json<Box<RawValue>>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    DateTime<Utc>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    fn sql(&mut self, sql: &str) {
        self.push(sql);
    }

    fn value(&mut self, value: Val<'a>) {
        match value {
            Val::Uuid(v) => self.push_bind(v),
            Val::Text(v) => self.push_bind(v),
            Val::NullableText(v) => self.push_bind(v),
            Val::Bool(v) => self.push_bind(v),
            Val::Int(v) => self.push_bind(v),
            Val::Json(v) => self.push_bind(sqlx::types::Json(v)),
            Val::Time(v) => self.push_bind(v),
        };
    }
}

/// A statement for PostgreSQL's simple-query protocol: values written as typed
/// literals (see the module note).
#[derive(Default)]
pub(super) struct Literal {
    text: String,
    /// A value held a NUL, which no literal can carry.
    nul: bool,
}

impl Literal {
    pub fn new(sql: &str) -> Self {
        Literal { text: sql.to_owned(), nul: false }
    }

    /// The SQL text, unless a value could not be written as a literal (then bind it).
    pub fn spliceable(self) -> Option<String> {
        (!self.nul).then_some(self.text)
    }

    fn quoted(&mut self, text: &str, cast: &str) {
        if text.contains('\0') {
            self.nul = true;
        }
        self.text.reserve(text.len() + cast.len() + 4);
        self.text.push('\'');
        for piece in text.split_inclusive('\'') {
            self.text.push_str(piece);
            if piece.ends_with('\'') {
                self.text.push('\'');
            }
        }
        self.text.push('\'');
        self.text.push_str(cast);
    }
}

impl Statement<'_> for Literal {
    fn sql(&mut self, sql: &str) {
        self.text.push_str(sql);
    }

    fn value(&mut self, value: Val<'_>) {
        // `write!` to a `String` cannot fail.
        match value {
            Val::Uuid(v) => {
                let _ = write!(self.text, "'{}'::uuid", v.hyphenated());
            }
            Val::Text(v) => self.quoted(&v, "::text"),
            Val::NullableText(Some(v)) => self.quoted(v, "::text"),
            Val::NullableText(None) => self.text.push_str("NULL::text"),
            Val::Bool(v) => self.text.push_str(if v { "true" } else { "false" }),
            // Quoted: a bare `-9223372036854775808` would be the negation of a number
            // too large for int8.
            Val::Int(v) => {
                let _ = write!(self.text, "'{v}'::int8");
            }
            Val::Json(v) => self.quoted(v.get(), "::jsonb"),
            // Microseconds, PostgreSQL's precision (a bound value is cut there too).
            Val::Time(v) => {
                let _ = write!(self.text, "'{}'::timestamptz", v.format("%Y-%m-%dT%H:%M:%S%.6fZ"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn literal(value: Val<'_>) -> Option<String> {
        let mut s = Literal::default();
        s.value(value);
        s.spliceable()
    }

    #[test]
    fn text_doubles_its_quotes_and_keeps_backslashes() {
        assert_eq!(
            literal(Val::Text("o'neil\\'; DROP TABLE users; --".into())).as_deref(),
            Some("'o''neil\\''; DROP TABLE users; --'::text")
        );
        assert_eq!(literal(Val::Text("''".into())).as_deref(), Some("''''''::text"));
        assert_eq!(literal(Val::NullableText(None)).as_deref(), Some("NULL::text"));
    }

    #[test]
    fn a_nul_makes_the_statement_unspliceable() {
        assert_eq!(literal(Val::Text("a\0b".into())), None);
    }

    #[test]
    fn typed_values_are_formatted_by_their_types() {
        let id = Uuid::nil();
        assert_eq!(literal(Val::Uuid(id)).as_deref(), Some("'00000000-0000-0000-0000-000000000000'::uuid"));
        assert_eq!(literal(Val::Int(-7)).as_deref(), Some("'-7'::int8"));
        assert_eq!(literal(Val::Int(i64::MIN)).as_deref(), Some("'-9223372036854775808'::int8"));
        let t = DateTime::parse_from_rfc3339("2026-12-06T10:11:12.123456789Z").map(|t| t.to_utc());
        assert_eq!(literal(Val::Time(t.unwrap())).as_deref(), Some("'2026-12-06T10:11:12.123456Z'::timestamptz"));
        let json = serde_json::value::to_raw_value(&serde_json::json!({"a": "it's"})).unwrap();
        assert_eq!(literal(Val::Json(json)).as_deref(), Some(r#"'{"a":"it''s"}'::jsonb"#));
    }

    #[test]
    fn rows_are_parenthesized_lists() {
        let mut s = Literal::default();
        s.rows([[Val::Int(1), Val::Bool(true)], [Val::Int(2), Val::Bool(false)]]);
        assert_eq!(s.spliceable().as_deref(), Some("VALUES ('1'::int8, true), ('2'::int8, false)"));
    }
}
