//! Cursor pagination shared by every list: `{items, next_cursor}` ordered by id.
//!
//! Ids are UUIDv7, so ordering by id is ordering by creation time and a cursor is just
//! the last id seen, encoded so clients treat it as opaque.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Serialize;
use uuid::Uuid;

use super::ValidationErrors;

/// Default and maximum page sizes.
pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 200;

/// An opaque position in a list: items strictly after this id come next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor(pub Uuid);

impl Cursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0.as_bytes())
    }

    pub fn decode(s: &str) -> Result<Self, ValidationErrors> {
        let bad =
            || ValidationErrors::single("cursor", "is not a cursor returned by this API; pass next_cursor unchanged");
        let bytes = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
        let id = Uuid::from_slice(&bytes).map_err(|_| bad())?;
        Ok(Cursor(id))
    }
}

/// A validated page request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub after: Option<Cursor>,
    pub limit: u32,
}

impl PageRequest {
    /// Validates raw query values: `limit` in 1..=200 (default 50), `cursor` opaque.
    pub fn parse(limit: Option<u32>, cursor: Option<&str>) -> Result<Self, ValidationErrors> {
        let mut errors = ValidationErrors::new();
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            errors.add("limit", format!("must be between 1 and {MAX_LIMIT}"));
        }
        let after = match cursor.filter(|c| !c.is_empty()) {
            None => None,
            Some(c) => match Cursor::decode(c) {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.errors.extend(e.errors);
                    None
                }
            },
        };
        errors.into_result(PageRequest { after, limit })
    }

    /// The first page with the default size.
    pub fn first() -> Self {
        PageRequest { after: None, limit: DEFAULT_LIMIT }
    }
}

/// One page of a list.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` rows: the extra row only says "there is more".
    pub fn from_rows(mut rows: Vec<T>, limit: u32, id_of: impl Fn(&T) -> Uuid) -> Self {
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let next_cursor = if more { rows.last().map(|r| Cursor(id_of(r)).encode()) } else { None };
        Page { items: rows, next_cursor }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let id = Uuid::now_v7();
        assert_eq!(Cursor::decode(&Cursor(id).encode()).unwrap(), Cursor(id));
        assert!(Cursor::decode("not-a-cursor!").is_err());
        assert!(Cursor::decode("AAAA").is_err());
    }

    #[test]
    fn limit_bounds() {
        assert_eq!(PageRequest::parse(None, None).unwrap().limit, DEFAULT_LIMIT);
        assert!(PageRequest::parse(Some(0), None).is_err());
        assert!(PageRequest::parse(Some(201), None).is_err());
        assert_eq!(PageRequest::parse(Some(200), Some("")).unwrap().limit, 200);
    }

    #[test]
    fn page_from_rows_sets_cursor_only_when_more() {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let p = Page::from_rows(ids.clone(), 2, |u| *u);
        assert_eq!(p.items.len(), 2);
        assert_eq!(p.next_cursor, Some(Cursor(ids[1]).encode()));
        let p = Page::from_rows(ids[..2].to_vec(), 2, |u| *u);
        assert_eq!(p.next_cursor, None);
    }
}
