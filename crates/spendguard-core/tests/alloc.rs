//! The admit path allocates nothing: a reservation and its commit, in steady state, make
//! no heap allocation.
//!
//! A binary of its own, because it installs a counting global allocator (dhat's, in its
//! testing mode) for the whole process.

use spendguard_core::*;
use uuid::Uuid;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const T0: i64 = 1_710_028_800_000_000;

/// `tier_extra` is added to the tier's section.
fn ledger(tier_extra: &str) -> Ledger {
    // Every kind of limit, set high enough never to deny here.
    let policy = Config::from_toml(&format!(
        "default_tier = \"enterprise\"\n[global]\nusd_per_day = \"1000000000\"\nusd_per_month = \"1000000000\"\n\
         [tenant]\nusd_per_day = \"1000000000\"\n[company]\nusd_per_day = \"1000000000\"\n\
         [tiers.enterprise]\nrequests_per_minute = 1000000\nrequests_per_day = 1000000000\n\
         tokens_per_day = 1000000000000\nmax_concurrent = 1000\nusd_per_day = \"1000000\"\nusd_per_month = \"1000000\"\n\
         {tier_extra}\n",
    ))
    .unwrap()
    .validate()
    .unwrap();
    Ledger::new(policy)
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

fn request(n: u64, subject: &Subject) -> ReserveRequest {
    ReserveRequest {
        id: Uuid::from_u64_pair(0, n),
        subject: subject.clone(),
        input_tokens: 500,
        max_output_tokens: Some(1000),
        estimated_cost: None,
        idempotency_key: None,
        ttl_us: None,
    }
}

fn commit(n: u64) -> CommitRequest {
    CommitRequest {
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
    }
}

/// Reserves each request and commits it, at `now`.
fn round(ledger: &Ledger, requests: &[ReserveRequest], commits: &[CommitRequest], now: i64) {
    for (req, c) in requests.iter().zip(commits) {
        let r = ledger.reserve(req, now).unwrap().unwrap();
        assert!(!r.value.replayed);
        ledger.commit(&r.value.reservation.id, c, now).unwrap();
    }
}

/// With no limit in shadow, and with limits in shadow that every request fits (a would-be
/// denial is built only when there is one). One test: the profiler is one per process.
#[test]
fn reserve_and_commit_allocate_nothing_in_steady_state() {
    let _profiler = dhat::Profiler::builder().testing().build();
    for tier_extra in ["", "shadow = [\"requests_per_minute\", \"usd_per_day\"]"] {
        allocate_nothing(ledger(tier_extra));
    }
}

fn allocate_nothing(ledger: Ledger) {
    let subjects: Vec<Subject> = (0..100).map(subject).collect();
    let build = |from: u64, count: u64| {
        let requests: Vec<_> = (from..from + count)
            .map(|n| request(n, &subjects[n as usize % subjects.len()]))
            .collect();
        let commits: Vec<_> = (from..from + count).map(commit).collect();
        (requests, commits)
    };
    // Warm up: every scope exists and the maps have grown to hold a round; then the
    // settled reservations are forgotten (the maps keep their capacity), and the same
    // round again is measured: the maps' growth is the one allocation a new id may cause.
    let (requests, commits) = build(0, 1_000);
    round(&ledger, &requests, &commits, T0);
    ledger.expire(T0 + 10_000_000);

    let before = dhat::HeapStats::get();
    round(&ledger, &requests, &commits, T0 + 20_000_000);
    let after = dhat::HeapStats::get();

    assert_eq!(
        after.total_blocks - before.total_blocks,
        0,
        "allocations in 1,000 reservations and commits"
    );
    // The limits of an admitted reservation are still there when asked for.
    let r = ledger
        .reserve(&request(99_999, &subjects[0]), T0 + 20_000_000)
        .unwrap()
        .unwrap();
    assert_eq!(r.value.limits.len(), 11);
    assert_eq!((&r.value.limits).into_iter().count(), 11);
    assert_eq!(r.value.limits.clone().into_vec(), r.value.limits.to_vec());
}
