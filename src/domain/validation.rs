//! Field-level validation errors, collected so a client learns every problem at once.

use serde::Serialize;

/// One invalid field and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// JSON pointer-ish path of the field, e.g. `email` or `attributes`.
    pub field: String,
    /// What is wrong, phrased as what to fix.
    pub message: String,
}

/// All the problems found in one input; empty means valid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("invalid input: {}", self.summary())]
pub struct ValidationErrors {
    pub errors: Vec<FieldError>,
}

impl ValidationErrors {
    pub fn new() -> Self {
        Self::default()
    }

    /// A single-field error, for call sites that find one problem.
    pub fn single(field: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new();
        e.add(field, message);
        e
    }

    pub fn add(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError { field: field.to_owned(), message: message.into() });
    }

    /// `Ok(value)` when nothing was added, the collected errors otherwise.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn into_result<T>(self, value: T) -> Result<T, Self> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }

    /// One line naming every field and its problem, for logs and `detail`.
    pub fn summary(&self) -> String {
        self.errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ")
    }
}

/// Checks a human-readable name: trimmed, 1..=200 characters, no control characters.
pub fn check_name(errors: &mut ValidationErrors, field: &str, value: &str) -> String {
    let trimmed = value.trim();
    let chars = trimmed.chars().count();
    if chars == 0 {
        errors.add(field, "must not be empty");
    } else if chars > 200 {
        errors.add(field, format!("must be at most 200 characters (got {chars})"));
    } else if trimmed.chars().any(char::is_control) {
        errors.add(field, "must not contain control characters");
    }
    trimmed.to_owned()
}
