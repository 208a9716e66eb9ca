//! Tenants: the unit of isolation. Every user, key and event belongs to exactly one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::validation::{check_name, ValidationErrors};

/// A tenant as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Tenant {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    /// 0 means unlimited.
    pub max_users: i64,
    /// Users the tenant has now; maintained in the same transactions that add/remove users.
    pub user_count: i64,
    /// Requests a second each of the tenant's API keys may make; 0 means no limit.
    pub rate_limit_per_second: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Body of `POST /v1/tenants`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenantInput {
    /// 1-200 characters, not blank, no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub name: String,
    /// The tenant's stable handle: 3-63 characters of a-z, 0-9 and '-'.
    #[schema(pattern = r"^[a-z0-9-]{3,63}$")]
    pub slug: String,
    /// Users the tenant may have; 0 (the default) means no limit.
    #[serde(default)]
    #[schema(maximum = 4294967295_u64)]
    pub max_users: Option<u32>,
    /// Requests a second per API key of the tenant; 0 (the default) means no limit.
    #[serde(default)]
    #[schema(maximum = 1000000)]
    pub rate_limit_per_second: Option<u32>,
}

/// A validated tenant, ready to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTenant {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    pub max_users: i64,
    pub rate_limit_per_second: i64,
    pub created_at: DateTime<Utc>,
}

impl NewTenant {
    pub fn parse(input: NewTenantInput, now: DateTime<Utc>) -> Result<Self, ValidationErrors> {
        let mut errors = ValidationErrors::new();
        let name = check_name(&mut errors, "name", &input.name);
        check_slug(&mut errors, &input.slug);
        if input.rate_limit_per_second.is_some_and(|r| r > 1_000_000) {
            errors.add("rate_limit_per_second", "must be at most 1000000 (0: no limit)");
        }
        errors.into_result(NewTenant {
            id: Uuid::now_v7(),
            slug: input.slug,
            name,
            max_users: i64::from(input.max_users.unwrap_or(0)),
            rate_limit_per_second: i64::from(input.rate_limit_per_second.unwrap_or(0)),
            created_at: now,
        })
    }

    /// The row as it reads back right after insertion.
    pub fn to_tenant(&self) -> Tenant {
        Tenant {
            id: self.id,
            slug: self.slug.clone(),
            name: self.name.clone(),
            max_users: self.max_users,
            rate_limit_per_second: self.rate_limit_per_second,
            user_count: 0,
            created_at: self.created_at,
            updated_at: self.created_at,
        }
    }
}

/// Body of `PATCH /v1/tenants/{id}`; absent fields stay as they are. The slug is the
/// tenant's stable public handle and cannot change.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantPatch {
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub name: Option<String>,
    /// 0 means no limit.
    #[schema(maximum = 4294967295_u64)]
    pub max_users: Option<u32>,
    /// Requests a second per API key; 0 means no limit.
    #[schema(maximum = 1000000)]
    pub rate_limit_per_second: Option<u32>,
}

impl TenantPatch {
    pub fn validate(mut self) -> Result<Self, ValidationErrors> {
        let mut errors = ValidationErrors::new();
        if let Some(name) = &self.name {
            self.name = Some(check_name(&mut errors, "name", name));
        }
        if self.rate_limit_per_second.is_some_and(|r| r > 1_000_000) {
            errors.add("rate_limit_per_second", "must be at most 1000000 (0: no limit)");
        }
        errors.into_result(self)
    }

    /// The tenant after the patch, or `None` when nothing would change.
    pub fn apply(&self, before: &Tenant, now: DateTime<Utc>) -> Option<Tenant> {
        let mut after = before.clone();
        if let Some(name) = &self.name {
            after.name = name.clone();
        }
        if let Some(max) = self.max_users {
            after.max_users = i64::from(max);
        }
        if let Some(rate) = self.rate_limit_per_second {
            after.rate_limit_per_second = i64::from(rate);
        }
        if after == *before {
            return None;
        }
        after.updated_at = now;
        Some(after)
    }
}

fn check_slug(errors: &mut ValidationErrors, slug: &str) {
    let ok_len = (3..=63).contains(&slug.len());
    let ok_chars = slug.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok_len || !ok_chars {
        errors.add("slug", "must be 3 to 63 characters of a-z, 0-9 and '-'");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(slug: &str, name: &str) -> NewTenantInput {
        NewTenantInput { name: name.into(), slug: slug.into(), max_users: None, rate_limit_per_second: None }
    }

    #[test]
    fn slug_rules() {
        let now = Utc::now();
        assert!(NewTenant::parse(input("acme-1", "Acme"), now).is_ok());
        for bad in ["ab", "Acme", "acme_1", "a".repeat(64).as_str(), "acmé"] {
            let err = NewTenant::parse(input(bad, "Acme"), now).unwrap_err();
            assert_eq!(err.errors[0].field, "slug", "{bad}");
        }
    }

    #[test]
    fn reports_every_bad_field() {
        let err = NewTenant::parse(input("A", "  "), Utc::now()).unwrap_err();
        let fields: Vec<_> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["name", "slug"]);
    }

    #[test]
    fn patch_without_change_is_none() {
        let t = NewTenant::parse(input("acme", "Acme"), Utc::now()).unwrap().to_tenant();
        let same = TenantPatch { name: Some("Acme".into()), max_users: Some(0), rate_limit_per_second: None };
        assert!(same.apply(&t, Utc::now()).is_none());
        let p = TenantPatch { max_users: Some(5), ..Default::default() };
        assert_eq!(p.apply(&t, Utc::now()).unwrap().max_users, 5);
    }
}
