//! Benchmarks of the ledger's hot path.
//!
//! `reserve_commit`: one reservation and its commit, across all four scopes (global, tenant,
//! company, user) and every user limit, over 10,000 users in 10 tenants, at a simulated
//! 20,000 calls per second with the once-a-second expiry sweep the server runs; priced by the
//! full built-in catalog (about 1,200 names), as shipped. `reserve_commit_small_table`: the
//! same with only the 43 hand-kept prices of `data/prices.toml`, for comparison.
//! `memory_per_user`: resident memory of the counters of 1,000,000 active users, printed
//! once (run with `cargo bench -p spendguard-core --bench ledger`).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use spendguard_core::*;
use uuid::Uuid;

const T0: i64 = 1_710_028_800_000_000;

fn ledger() -> Ledger {
    ledger_with_retention(DEFAULT_RETENTION_US)
}

/// The same ledger, priced by the small hand-kept table instead of the catalog.
fn ledger_small_table() -> Ledger {
    let mut policy = policy();
    policy.prices = spendguard_core::PriceTable::small();
    Ledger::with_retention(policy, DEFAULT_RETENTION_US)
}

fn ledger_with_retention(retention_us: i64) -> Ledger {
    Ledger::with_retention(policy(), retention_us)
}

fn policy() -> Policy {
    // The enterprise tier has every kind of limit, set high enough never to deny here.
    Config::from_toml(
        "default_tier = \"enterprise\"\n[global]\nusd_per_day = \"1000000000\"\nusd_per_month = \"1000000000\"\n\
         [tiers.enterprise]\nrequests_per_minute = 1000000\nrequests_per_day = 1000000000\n\
         tokens_per_day = 1000000000000\nusd_per_day = \"1000000\"\nusd_per_month = \"1000000\"\n\
         [tenant]\nusd_per_day = \"1000000000\"\nmax_tracked_subjects = \"unlimited\"\n[company]\nusd_per_day = \"1000000000\"",
    )
    .unwrap()
    .validate()
    .unwrap()
}

fn subject(i: usize) -> Subject {
    Subject {
        tenant: TenantId::parse(&format!("tenant-{}", i % 10)).unwrap(),
        user: UserId::parse(&format!("user-{i}")).unwrap(),
        company: Some(CompanyId::parse(&format!("company-{}", i % 100)).unwrap()),
        tier: None,
        trusted_tier: true,
        model: ModelName::parse("gpt-4o-2024-08-06").unwrap(),
        endpoint: None,
    }
}

fn subjects(n: usize) -> Vec<Subject> {
    (0..n).map(subject).collect()
}

fn reserve_commit(c: &mut Criterion) {
    bench_reserve_commit(c, "reserve_commit", ledger());
    bench_reserve_commit(c, "reserve_commit_small_table", ledger_small_table());
}

fn bench_reserve_commit(c: &mut Criterion, name: &str, ledger: Ledger) {
    let subjects = subjects(10_000);
    let mut n: u64 = 0;
    let commit = |n: u64| CommitRequest {
        usage_id: Uuid::from_u64_pair(1, n),
        tokens: Tokens {
            input: 500,
            cached_input: 100,
            output: 200,
            ..Default::default()
        },
        cost: None,
        status: RequestStatus::Success,
        origin: None,
    };
    c.bench_function(name, |b| {
        b.iter(|| {
            n += 1;
            let req = ReserveRequest {
                id: Uuid::from_u64_pair(0, n),
                subject: subjects[n as usize % subjects.len()].clone(),
                input_tokens: 500,
                max_output_tokens: Some(1000),
                estimated_cost: None,
                idempotency_key: None,
                ttl_us: None,
            };
            // 20,000 calls a second, swept once a second, as the server does.
            let now = T0 + 50 * n as i64;
            let r = ledger.reserve(black_box(&req), now).unwrap().unwrap();
            let c = ledger
                .commit(&r.value.reservation.id, &commit(n), now)
                .unwrap();
            black_box(c);
            if n % 20_000 == 0 {
                ledger.expire(now);
            }
        })
    });
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

fn memory_per_user(_: &mut Criterion) {
    const USERS: usize = 1_000_000;
    // Settled reservations are forgotten at each sweep, so only the counters remain.
    let ledger = ledger_with_retention(0);
    let before = resident_bytes();
    for i in 0..USERS {
        // Each user's ids are allocated here and owned by the ledger alone.
        let s = subject(i);
        let req = ReserveRequest {
            id: Uuid::from_u64_pair(2, i as u64),
            subject: s,
            input_tokens: 10,
            max_output_tokens: Some(10),
            estimated_cost: None,
            idempotency_key: None,
            ttl_us: None,
        };
        let r = ledger.reserve(&req, T0).unwrap().unwrap();
        let commit = CommitRequest {
            usage_id: Uuid::from_u64_pair(3, i as u64),
            tokens: Tokens {
                input: 10,
                cached_input: 0,
                output: 10,
                ..Default::default()
            },
            cost: None,
            status: RequestStatus::Success,
            origin: None,
        };
        ledger.commit(&r.value.reservation.id, &commit, T0).unwrap();
        if i % 10_000 == 0 {
            ledger.expire(T0);
        }
    }
    ledger.expire(T0);
    let after = resident_bytes();
    println!(
        "memory_per_user: {} scopes, {:.0} bytes per active user (resident set grew {:.1} MiB)",
        ledger.scope_count(),
        after.saturating_sub(before) as f64 / USERS as f64,
        after.saturating_sub(before) as f64 / (1 << 20) as f64,
    );
}

criterion_group!(benches, reserve_commit, memory_per_user);
criterion_main!(benches);
