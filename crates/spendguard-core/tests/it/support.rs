//! Shared helpers: policies, subjects and requests.

use spendguard_core::*;
use uuid::Uuid;

pub const DAY: i64 = 86_400_000_000;
pub const MINUTE: i64 = 60_000_000;
/// 2024-03-10T00:00:00Z in microseconds.
pub const T0: i64 = 1_710_028_800_000_000;

pub fn policy(toml: &str) -> Policy {
    Config::from_toml(toml).unwrap().validate().unwrap()
}

pub fn usd(s: &str) -> Money {
    Money::parse_usd(s).unwrap()
}

pub fn subject(tenant: &str, user: &str, company: Option<&str>) -> Subject {
    Subject {
        tenant: TenantId::parse(tenant).unwrap(),
        user: UserId::parse(user).unwrap(),
        company: company.map(|c| CompanyId::parse(c).unwrap()),
        tier: None,
        trusted_tier: true,
        model: ModelName::parse("gpt-4o").unwrap(),
        endpoint: None,
    }
}

/// Sequential ids, so tests are deterministic.
pub fn id(n: u64) -> Uuid {
    Uuid::from_u64_pair(0, n)
}

pub fn reserve_req(n: u64, subject: Subject, estimate: Money) -> ReserveRequest {
    ReserveRequest {
        id: id(n),
        subject,
        input_tokens: 100,
        max_output_tokens: Some(100),
        estimated_cost: Some(estimate),
        idempotency_key: None,
        ttl_us: None,
    }
}

pub fn commit_req(n: u64, cost: Money) -> CommitRequest {
    CommitRequest {
        usage_id: id(n),
        tokens: Tokens {
            input: 100,
            cached_input: 0,
            output: 50,
            ..Default::default()
        },
        cost: Some(cost),
        status: RequestStatus::Success,
        origin: None,
    }
}

pub fn amount_usd(a: Amount) -> Money {
    match a {
        Amount::Usd(m) => m,
        Amount::Count(_) => panic!("not money"),
    }
}

pub fn count(a: Amount) -> u64 {
    match a {
        Amount::Count(n) => n,
        Amount::Usd(_) => panic!("not a count"),
    }
}

/// Fails if any limit has `used + reserved > limit`.
pub fn assert_within(limits: &[LimitStatus]) {
    for l in limits {
        let ok = match (l.limit, l.used, l.reserved) {
            (Amount::Usd(c), Amount::Usd(u), Amount::Usd(r)) => u.checked_add(r).unwrap() <= c,
            (Amount::Count(c), Amount::Count(u), Amount::Count(r)) => u + r <= c,
            _ => false,
        };
        assert!(ok, "limit exceeded: {l:?}");
    }
}
