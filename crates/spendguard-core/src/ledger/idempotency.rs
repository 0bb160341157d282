//! Idempotency: request fingerprints, the keys remembered in memory, and the id of a late
//! commit's record.

use std::sync::Mutex;

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::state::lock;
use super::types::*;
use super::{HashMap, Ledger, SHARDS};
use crate::ids::{IdempotencyKey, TenantId};
use crate::window::Micros;
use std::hash::BuildHasher;

#[derive(Debug)]
pub(super) enum Remembered {
    Reservation(Box<Reservation>),
    Usage(Box<UsageRecord>),
}

#[derive(Debug)]
pub(super) struct IdemEntry {
    pub(super) fingerprint: u64,
    pub(super) result: Remembered,
    /// Remembered until then: the retention, and for a reservation at least its expiry.
    pub(super) until: Micros,
}

#[derive(Debug, Default)]
pub(super) struct IdemShard {
    pub(super) keys: HashMap<(TenantId, IdempotencyKey), IdemEntry>,
}

/// The canonical encoding of a request whose SHA-256 is its fingerprint: a version tag and
/// the request's kind, then each field in a fixed order, strings and options with explicit
/// lengths and markers, integers big-endian. It is persisted (reservations keep it for
/// retries across restarts), so it never depends on `Hash` implementations or the
/// toolchain; changing it needs a new version tag.
struct Canonical(Sha256);

impl Canonical {
    fn new(kind: &str) -> Canonical {
        let mut c = Canonical(Sha256::new());
        c.str("spendguard.fingerprint.v1");
        c.str(kind);
        c
    }
    fn u64(&mut self, v: u64) {
        self.0.update(v.to_be_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.update(v.to_be_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.update(s.as_bytes());
    }
    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.0.update([0u8]),
            Some(v) => {
                self.0.update([1u8]);
                f(self, v);
            }
        }
    }
    fn subject(&mut self, s: &Subject) {
        self.str(s.tenant.as_str());
        self.str(s.user.as_str());
        self.opt(s.company.as_ref(), |c, v| c.str(v.as_str()));
        self.opt(s.tier.as_ref(), |c, v| c.str(v.as_str()));
        self.str(s.model.as_str());
        self.opt(s.endpoint.as_ref(), |c, v| c.str(v.as_str()));
    }
    /// The first eight bytes of the digest, big-endian.
    fn finish(self) -> u64 {
        let digest = self.0.finalize();
        u64::from_be_bytes(
            digest[..8]
                .try_into()
                .expect("a SHA-256 digest has 32 bytes"),
        )
    }
}

/// The fingerprint of a reservation request, compared when its idempotency key is reused.
pub fn reserve_fingerprint(req: &ReserveRequest) -> u64 {
    let mut c = Canonical::new("reserve");
    c.subject(&req.subject);
    c.u64(req.input_tokens);
    c.opt(req.max_output_tokens, Canonical::u64);
    c.opt(req.estimated_cost, |c, m| c.i64(m.micros()));
    c.opt(req.ttl_us, Canonical::i64);
    c.finish()
}

/// The fingerprint of a direct record request, compared when its idempotency key is reused.
pub fn record_fingerprint(req: &RecordRequest) -> u64 {
    let mut c = Canonical::new("record");
    c.subject(&req.subject);
    c.u64(req.tokens.input);
    c.u64(req.tokens.cached_input);
    c.u64(req.tokens.output);
    // The newer token kinds only when given, so a record without them keeps the fingerprint
    // it had before they existed.
    let t = &req.tokens;
    if t.cache_creation != 0 || t.cache_creation_1h != 0 || t.reasoning != 0 {
        c.str("kinds");
        c.u64(t.cache_creation);
        c.u64(t.cache_creation_1h);
        c.u64(t.reasoning);
    }
    c.opt(req.cost, |c, m| c.i64(m.micros()));
    c.str(req.status.as_str());
    c.finish()
}

/// The id of the usage record of a commit that arrives after its reservation expired: a
/// UUID (version 8) derived from the reservation id, so a retried late commit, even after a
/// restart, can only ever create the same record.
pub fn late_usage_id(reservation: &Uuid) -> Uuid {
    let mut h = Sha256::new();
    h.update(b"spendguard.late-commit.v1");
    h.update(reservation.as_bytes());
    let digest = h.finalize();
    Uuid::new_v8(
        digest[..16]
            .try_into()
            .expect("a SHA-256 digest has 32 bytes"),
    )
}

impl Ledger {
    pub(super) fn idem_shard(&self, tenant: &TenantId, key: &IdempotencyKey) -> &Mutex<IdemShard> {
        &self.idempotency[(self.hasher.hash_one((tenant, key)) as usize) % SHARDS]
    }

    /// Remembers the key of an admitted reservation until `until`.
    pub(super) fn remember_key(shard: &mut IdemShard, res: &Reservation, until: Micros) {
        if let Some(k) = &res.idempotency_key {
            shard.keys.insert(
                (res.subject.tenant.clone(), k.clone()),
                IdemEntry {
                    fingerprint: res.fingerprint,
                    result: Remembered::Reservation(Box::new(res.clone())),
                    until,
                },
            );
        }
    }

    /// True when an idempotency key of this tenant is remembered in memory.
    pub fn knows_key(&self, tenant: &TenantId, key: &IdempotencyKey) -> bool {
        lock(self.idem_shard(tenant, key))
            .keys
            .contains_key(&(tenant.clone(), key.clone()))
    }
}
