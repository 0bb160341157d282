//! API keys: generation, hashing, the in-memory key ring and the `Caller` extractor.
//!
//! A key is `sg_` followed by 64 hex digits (256 random bits). Only its SHA-256 is stored; a
//! plain hash is enough because keys are random, not chosen by people. Presented keys are
//! hashed and looked up by hash; the admin key from the environment is compared in constant
//! time. Keys are never logged.

use std::collections::HashMap;
use std::sync::RwLock;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use spendguard_core::TenantId;
use spendguard_store::{AnyStore, ApiKeyRecord, StoreError};

use crate::AppState;
use crate::error::ApiError;

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The admin key: may do everything.
    Admin,
    /// A tenant key: may act on and read only its own tenant.
    Tenant(TenantId),
}

impl Caller {
    /// Refuses a tenant key acting on another tenant.
    pub fn may_act_on(&self, tenant: &TenantId) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Tenant(t) if t == tenant => Ok(()),
            Caller::Tenant(_) => Err(ApiError::forbidden("this key belongs to another tenant")),
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Tenant(_) => Err(ApiError::forbidden("this route needs the admin key")),
        }
    }
}

/// The shortest admin or metrics key accepted from the environment: 32 characters (a
/// generated key has 67, 256 random bits).
pub const MIN_ENV_KEY_LEN: usize = 32;

/// Checks a key given in the environment variable `name`.
pub fn check_env_key(name: &str, key: &str) -> Result<(), String> {
    let n = key.chars().count();
    if n < MIN_ENV_KEY_LEN {
        return Err(format!(
            "{name} must be at least {MIN_ENV_KEY_LEN} characters long (it has {n}); a random \
             one: `openssl rand -hex 32`"
        ));
    }
    Ok(())
}

/// A new random key.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    format!("sg_{}", hex::encode(bytes))
}

/// The stored form of a key.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Constant-time equality of two hashes.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The valid keys, by hash, kept in memory so authentication needs no database read.
#[derive(Debug, Default)]
pub struct KeyRing {
    env_admin: Option<[u8; 32]>,
    /// The key that may read `/metrics` only (`SPENDGUARD_METRICS_KEY`).
    metrics: Option<[u8; 32]>,
    keys: RwLock<HashMap<[u8; 32], Option<TenantId>>>,
}

impl KeyRing {
    /// Loads the unrevoked keys. `env_admin` is the admin key from `SPENDGUARD_ADMIN_KEY`.
    pub async fn load(store: &AnyStore, env_admin: Option<&str>) -> Result<KeyRing, StoreError> {
        let keys = active_keys(store).await?;
        Ok(KeyRing {
            env_admin: env_admin.map(hash_key),
            metrics: None,
            keys: RwLock::new(keys),
        })
    }

    /// Also accepts `key` (from `SPENDGUARD_METRICS_KEY`) on `/metrics`, and nowhere else.
    pub fn with_metrics_key(mut self, key: Option<&str>) -> KeyRing {
        self.metrics = key.map(hash_key);
        self
    }

    /// Whether `key` may read `/metrics`: the admin key or the metrics key.
    pub fn may_read_metrics(&self, key: &str) -> bool {
        let h = hash_key(key);
        self.metrics.as_ref().is_some_and(|m| same(m, &h))
            || matches!(self.authenticate(key), Some(Caller::Admin))
    }

    /// Re-reads the keys, so keys created or revoked by `spendguard keys` apply.
    pub async fn reload(&self, store: &AnyStore) -> Result<(), StoreError> {
        let keys = active_keys(store).await?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(())
    }

    /// Whether an admin key exists (from the environment or stored).
    pub fn has_admin(&self) -> bool {
        self.env_admin.is_some()
            || self
                .keys
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .any(Option::is_none)
    }

    pub fn add(&self, hash: [u8; 32], tenant: Option<TenantId>) {
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hash, tenant);
    }

    pub fn remove(&self, hash: &[u8; 32]) {
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(hash);
    }

    /// Whether the key whose hash is `h` is still an admin key (not revoked).
    pub fn is_admin_hash(&self, h: &[u8; 32]) -> bool {
        if let Some(admin) = &self.env_admin
            && same(admin, h)
        {
            return true;
        }
        matches!(
            self.keys.read().unwrap_or_else(|e| e.into_inner()).get(h),
            Some(None)
        )
    }

    /// Who the key whose hash is `h` is, if it is still valid (not revoked).
    pub fn caller_of_hash(&self, h: &[u8; 32]) -> Option<Caller> {
        if let Some(admin) = &self.env_admin
            && same(admin, h)
        {
            return Some(Caller::Admin);
        }
        match self.keys.read().unwrap_or_else(|e| e.into_inner()).get(h) {
            Some(None) => Some(Caller::Admin),
            Some(Some(t)) => Some(Caller::Tenant(t.clone())),
            None => None,
        }
    }

    pub fn authenticate(&self, key: &str) -> Option<Caller> {
        let h = hash_key(key);
        if let Some(admin) = &self.env_admin
            && same(admin, &h)
        {
            return Some(Caller::Admin);
        }
        match self.keys.read().unwrap_or_else(|e| e.into_inner()).get(&h) {
            Some(None) => Some(Caller::Admin),
            Some(Some(t)) => Some(Caller::Tenant(t.clone())),
            None => None,
        }
    }
}

async fn active_keys(store: &AnyStore) -> Result<HashMap<[u8; 32], Option<TenantId>>, StoreError> {
    let mut keys = HashMap::new();
    for k in store.list_api_keys().await? {
        if k.revoked_at.is_none()
            && let Ok(bytes) = hex::decode(&k.hash)
            && let Ok(hash) = <[u8; 32]>::try_from(bytes.as_slice())
        {
            keys.insert(hash, k.tenant.clone());
        }
    }
    Ok(keys)
}

/// Creates and stores a key; returns it (to show once) and its record.
pub async fn create_key(
    store: &AnyStore,
    ring: &KeyRing,
    tenant: Option<TenantId>,
    now: i64,
) -> Result<(String, ApiKeyRecord), StoreError> {
    let key = generate_key();
    let hash = hash_key(&key);
    let record = ApiKeyRecord {
        id: uuid::Uuid::now_v7().to_string(),
        tenant: tenant.clone(),
        hash: hex::encode(hash),
        prefix: key[..11].to_owned(),
        created_at: now,
        revoked_at: None,
    };
    store.insert_api_key(&record).await?;
    ring.add(hash, tenant);
    Ok((key, record))
}

/// The key of an `Authorization: Bearer <key>` header, if there is one. The scheme is
/// matched without regard to case (RFC 7235 §2.1).
pub fn bearer_key(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim_start();
    let (scheme, key) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let key = bearer_key(&parts.headers)
            .ok_or_else(|| ApiError::unauthorized("send `Authorization: Bearer <key>`"))?;
        state
            .keys
            .authenticate(key)
            .ok_or_else(|| ApiError::unauthorized("unknown or revoked API key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_hash_stably() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), 67);
        assert!(a.starts_with("sg_"));
        assert_eq!(hash_key(&a), hash_key(&a));
        assert!(same(&hash_key(&a), &hash_key(&a)));
        assert!(!same(&hash_key(&a), &hash_key(&b)));
    }

    #[test]
    fn the_ring_authenticates_by_hash() {
        let ring = KeyRing {
            env_admin: Some(hash_key("root")),
            ..Default::default()
        };
        let t = TenantId::parse("acme").unwrap();
        ring.add(hash_key("tenant-key"), Some(t.clone()));
        assert_eq!(ring.authenticate("root"), Some(Caller::Admin));
        assert_eq!(ring.authenticate("tenant-key"), Some(Caller::Tenant(t)));
        assert_eq!(ring.authenticate("nope"), None);
        ring.remove(&hash_key("tenant-key"));
        assert_eq!(ring.authenticate("tenant-key"), None);
    }
}
