//! Cluster mode: several guards (instances) on one PostgreSQL schema, exact across all.

use std::sync::Arc;
use std::time::Duration;

use spendguard_core::*;
use spendguard_guard::cluster::ClusterOptions;
use spendguard_guard::{Clock, Guard, GuardError, GuardOptions, SystemClock};
use spendguard_store::{AnyStore, OpenOptions, Store, StoreError};
use uuid::Uuid;

use crate::support::*;

/// The global budget admits 200 reservations of 0.01.
const CLUSTER_POLICY: &str = r#"
[global]
usd_per_day = "2"
usd_per_month = "1000"
[tenant]
max_share_of_global = 1.0
[tiers.free]
requests_per_minute = "unlimited"
requests_per_day = "unlimited"
tokens_per_day = "unlimited"
usd_per_day = "1"
usd_per_month = "10"
max_concurrent = "unlimited"
allowed_models = ["*"]
"#;

struct Cluster {
    url: String,
    guards: Vec<Guard<AnyStore>>,
    _dir: tempfile::TempDir,
}

async fn fresh_schema(url: &str, name: &str) -> String {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let (admin, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let schema = format!("sg_cluster_{name}_{}", std::process::id());
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await
        .unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

fn cluster_options() -> OpenOptions {
    OpenOptions {
        cluster: true,
        pool_size: 4,
        ..OpenOptions::default()
    }
}

async fn instance(url: &str, dir: &std::path::Path, n: usize, policy: &str) -> Guard<AnyStore> {
    instance_with(url, dir, n, policy, |_| {}).await
}

async fn instance_with(
    url: &str,
    dir: &std::path::Path,
    n: usize,
    policy: &str,
    set: impl FnOnce(&mut ClusterOptions),
) -> Guard<AnyStore> {
    let store = AnyStore::open(url, &cluster_options()).await.unwrap();
    let mut options = GuardOptions::new(dir.join(format!("spool{n}")));
    options.sweep_interval = Duration::from_millis(100);
    let mut c = ClusterOptions::new(format!("i{n}"), format!("test:{n}"));
    c.heartbeat = Duration::from_millis(100);
    set(&mut c);
    options.cluster = Some(c);
    let policy = Config::from_toml(policy).unwrap().validate().unwrap();
    Guard::start(store, policy, options, Arc::new(SystemClock))
        .await
        .unwrap()
}

async fn cluster(name: &str, n: usize) -> Option<Cluster> {
    let url = fresh_schema(&pg_url()?, name).await;
    let dir = tempfile::tempdir().unwrap();
    let mut guards = Vec::new();
    for i in 0..n {
        guards.push(instance(&url, dir.path(), i, CLUSTER_POLICY).await);
    }
    Some(Cluster {
        url,
        guards,
        _dir: dir,
    })
}

fn cents(subject: Subject, n: i64) -> ReserveRequest {
    reserve(subject, n * 10_000)
}

/// What the shared rows must keep: for every scope, its reserved money, reserved requests
/// and in-flight count equal the sums over its open reservations, and its spend equals
/// its usage records; and no window's spend plus reservations passes its limit.
async fn assert_invariant(c: &Cluster, global_limit: Money) {
    let store = c.guards[0].store();
    let pg = store.postgres().unwrap();
    let config: tokio_postgres::Config = c.url.parse().unwrap();
    let (db, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let counters = pg.cluster_all_counters().await.unwrap();
    assert!(!counters.is_empty());
    for (key, row) in counters {
        let (cond, args): (&str, Vec<String>) = match &key {
            ScopeKey::Global => ("true", vec![]),
            ScopeKey::Tenant(t) => ("tenant_id = $1", vec![t.as_str().into()]),
            ScopeKey::Company(t, co) => (
                "tenant_id = $1 AND company_id = $2",
                vec![t.as_str().into(), co.as_str().into()],
            ),
            ScopeKey::User(t, u) => (
                "tenant_id = $1 AND user_id = $2",
                vec![t.as_str().into(), u.as_str().into()],
            ),
        };
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = args
            .iter()
            .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let open = db
            .query_one(
                &format!(
                    "SELECT coalesce(sum(estimate_micros), 0)::int8, count(*) FROM reservations \
                     WHERE state = 'open' AND {cond}"
                ),
                &params,
            )
            .await
            .unwrap();
        let (reserved, open_count): (i64, i64) = (open.get(0), open.get(1));
        assert_eq!(row.day.reserved.micros(), reserved, "{key:?}: reserved");
        assert_eq!(i64::from(row.in_flight), open_count, "{key:?}: in flight");
        assert_eq!(row.day.requests_reserved as i64, open_count, "{key:?}");
        let spent = db
            .query_one(
                &format!(
                    "SELECT coalesce(sum(cost_usd * 1000000), 0)::int8, count(*) FROM ai_usage \
                     WHERE request_status <> 'expired' AND {cond}"
                ),
                &params,
            )
            .await
            .unwrap();
        let (spent, records): (i64, i64) = (spent.get(0), spent.get(1));
        assert_eq!(row.day.spent.micros(), spent, "{key:?}: spent");
        assert_eq!(row.day.requests as i64, records, "{key:?}: requests");
        if key == ScopeKey::Global {
            assert!(
                row.day.spent.saturating_add(row.day.reserved) <= global_limit,
                "over the global budget: {row:?}"
            );
        }
    }
    assert_rollups_match(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_admit_exactly_the_budget_and_settle_anywhere() {
    let Some(c) = cluster("exact", 3).await else {
        return;
    };
    // 600 reservations of 0.01 at once, round robin; the global budget admits 200.
    let mut tasks = Vec::new();
    for i in 0..600 {
        let g = c.guards[i % 3].clone();
        tasks.push(tokio::spawn(async move {
            let s = subject(&format!("t{}", i % 7), &format!("u{i}"));
            g.reserve(cents(s, 1)).await.unwrap()
        }));
    }
    let mut admitted = Vec::new();
    for t in tasks {
        if let Ok(r) = t.await.unwrap() {
            admitted.push(r.reservation.id);
        }
    }
    // Never more than the budget; fewer only by what other instances' allowances held
    // idle (at most a sixth of the free capacity each, docs/cluster.md), and that comes
    // back within a heartbeat: retried, exactly the budget is admitted.
    assert!(
        (200 - 66..=200).contains(&admitted.len()),
        "admitted across the cluster: {}",
        admitted.len()
    );
    assert_invariant(&c, Money::parse_usd("2").unwrap()).await;
    admitted.extend(fill_to_refusal(&c.guards, "w").await);
    assert_eq!(admitted.len(), 200, "admitted across the cluster");
    assert_invariant(&c, Money::parse_usd("2").unwrap()).await;
    // Each settled on another instance than the one that made it (any of them).
    let mut tasks = Vec::new();
    for (i, id) in admitted.iter().copied().enumerate() {
        let g = c.guards[(i + 1) % 3].clone();
        tasks.push(tokio::spawn(async move {
            if i % 4 == 0 {
                g.release(id, None).await.map(|_| ())
            } else {
                g.commit(id, commit(5_000)).await.map(|_| ())
            }
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // A retried commit on a third instance answers the first commit.
    let first = c.guards[2]
        .commit(admitted[1], commit(5_000))
        .await
        .unwrap();
    assert!(first.replayed);
    assert_invariant(&c, Money::parse_usd("2").unwrap()).await;
    // 150 commits of 0.005: 0.75 spent, so 125 more reservations of 0.01 fit.
    assert_eq!(fill_to_refusal(&c.guards, "v").await.len(), 125);
    assert_invariant(&c, Money::parse_usd("2").unwrap()).await;
    for g in &c.guards {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyed_retry_on_another_instance_answers_the_same_reservation() {
    let Some(c) = cluster("keys", 2).await else {
        return;
    };
    let mut req = cents(subject("t", "u"), 3);
    req.idempotency_key = Some(IdempotencyKey::parse("k-1").unwrap());
    let a = c.guards[0].reserve(req.clone()).await.unwrap().unwrap();
    let b = c.guards[1].reserve(req.clone()).await.unwrap().unwrap();
    assert_eq!(a.reservation.id, b.reservation.id);
    assert!(b.replayed);
    // The same key with another request is a conflict, on either instance.
    let mut other = req.clone();
    other.estimated_cost = Some(Money::from_micros(70_000));
    let err = c.guards[1].reserve(other).await.unwrap_err();
    assert!(
        matches!(err, GuardError::Ledger(LedgerError::IdempotencyConflict(_))),
        "{err}"
    );
    // Racing retries of a new key on both instances admit once.
    let mut req = cents(subject("t", "w"), 3);
    req.idempotency_key = Some(IdempotencyKey::parse("k-2").unwrap());
    let (x, y) = tokio::join!(
        c.guards[0].reserve(req.clone()),
        c.guards[1].reserve(req.clone())
    );
    let (x, y) = (x.unwrap().unwrap(), y.unwrap().unwrap());
    assert_eq!(x.reservation.id, y.reservation.id);
    assert!(x.replayed != y.replayed);
    // A keyed direct record, retried on the other instance, is recorded once.
    let rec = RecordRequest {
        id: Uuid::nil(),
        subject: subject("t", "r"),
        tokens: Tokens {
            input: 10,
            output: 10,
            ..Default::default()
        },
        cost: Some(Money::from_micros(1_000)),
        status: RequestStatus::Success,
        idempotency_key: Some(IdempotencyKey::parse("rec-1").unwrap()),
    };
    let (r1, replay1) = c.guards[0].record_replayable(rec.clone()).await.unwrap();
    let (r2, replay2) = c.guards[1].record_replayable(rec).await.unwrap();
    assert_eq!((r1.id, replay1, replay2), (r2.id, false, true));
    assert_invariant(&c, Money::parse_usd("2").unwrap()).await;
    for g in &c.guards {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_set_on_one_instance_is_enforced_by_another_within_a_heartbeat() {
    let Some(c) = cluster("config", 2).await else {
        return;
    };
    let user = ScopeKey::User(TenantId::parse("t").unwrap(), UserId::parse("u").unwrap());
    let budget = BudgetOverride {
        daily: Some(Money::from_micros(50_000)),
        monthly: None,
    };
    c.guards[0].set_budget(user.clone(), budget).await.unwrap();
    // The other instance reloads it at its next heartbeat (100 ms here).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.guards[1].ledger().budget_override(&user) != Some(budget) {
        assert!(tokio::time::Instant::now() < deadline, "never reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, stats) = c.guards[1].cluster().unwrap();
    assert!(stats.config_reloads >= 1);
    assert!(
        c.guards[1]
            .reserve(cents(subject("t", "u"), 6))
            .await
            .unwrap()
            .is_err()
    );
    assert!(
        c.guards[1]
            .reserve(cents(subject("t", "u"), 4))
            .await
            .unwrap()
            .is_ok()
    );
    // Cleared on the first, it is cleared on the other too.
    c.guards[0]
        .set_budget(user.clone(), BudgetOverride::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.guards[1].ledger().budget_override(&user).is_some() {
        assert!(tokio::time::Instant::now() < deadline, "never cleared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for g in &c.guards {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reservations_of_a_stopped_instance_are_expired_by_another() {
    let Some(c) = cluster("expiry", 2).await else {
        return;
    };
    // 101 reservations made at once (so in a few batches), due together.
    let batches_before = c.guards[1].cluster().unwrap().1.batches;
    let made: Vec<_> = (0..101)
        .map(|i| {
            let g = c.guards[0].clone();
            let mut req = cents(subject("t", &format!("u{i}")), if i == 0 { 50 } else { 1 });
            req.ttl_us = Some(1_000_000);
            tokio::spawn(async move { g.reserve(req).await.unwrap().unwrap() })
        })
        .collect();
    let mut ids = Vec::new();
    for m in made {
        ids.push(m.await.unwrap().reservation.id);
    }
    c.guards[0].shutdown().await;
    let pg = c.guards[1].store().postgres().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let global = loop {
        let global = pg
            .cluster_counters(&[ScopeKey::Global])
            .await
            .unwrap()
            .remove(0)
            .1;
        if global.in_flight == 0 {
            break global;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never expired: {global:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(global.day.reserved, Money::ZERO);
    for id in ids {
        let stored = c.guards[1].store().reservation(id).await.unwrap().unwrap();
        assert_eq!(stored.state, spendguard_store::ReservationState::Expired);
    }
    // Reservations due together are expired in a few batches, not one each.
    let batches = c.guards[1].cluster().unwrap().1.batches - batches_before;
    assert!(batches < 30, "{batches} batches to expire 101 reservations");
    assert_invariant(&c, Money::parse_usd("2").unwrap()).await;
    c.guards[1].shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_and_cluster_instances_refuse_each_others_database() {
    let Some(url) = pg_url() else { return };
    let url = fresh_schema(&url, "modes").await;
    let single = AnyStore::open(&url, &OpenOptions::default()).await.unwrap();
    let err = AnyStore::open(&url, &cluster_options()).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Locked(ref m) if m.contains("single-node")),
        "{err}"
    );
    drop(single);
    let a = AnyStore::open(&url, &cluster_options()).await.unwrap();
    let _b = AnyStore::open(&url, &cluster_options()).await.unwrap();
    let err = AnyStore::open(&url, &OpenOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Locked(ref m) if m.contains("cluster")),
        "{err}"
    );
    drop(a);
    // And cluster mode on SQLite is refused with a clear error.
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir.path().join("db")).await;
    let mut options = GuardOptions::new(dir.path().join("spool"));
    options.cluster = Some(ClusterOptions::new("x", "y"));
    let err = Guard::start(store, policy(), options, Arc::new(SystemClock))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("cluster mode needs PostgreSQL"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_value_postgres_refuses_fails_its_own_request_only() {
    let Some(c) = cluster("refused", 1).await else {
        return;
    };
    let g = &c.guards[0];
    let mut ids = Vec::new();
    for i in 0..41 {
        let r = g
            .reserve(cents(subject("t", &format!("u{i}")), 1))
            .await
            .unwrap();
        ids.push(r.unwrap().reservation.id);
    }
    // One release whose reason PostgreSQL cannot hold (U+0000), among forty commits sent
    // at the same moment: they are decided in the same batches.
    let bad = ids[20];
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().copied().enumerate() {
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            if i == 20 {
                g.release(id, Some("bad\0reason".into())).await.map(|_| ())
            } else {
                g.commit(id, commit(5_000)).await.map(|_| ())
            }
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let refused = results.remove(20).unwrap_err();
    assert!(matches!(refused, GuardError::Rejected(_)), "{refused}");
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(
        failed.is_empty(),
        "requests beside the refused one failed: {failed:?}"
    );
    // The refused release changed nothing: the reservation is still open, and it is kept
    // for an operator.
    let stored = g.store().reservation(bad).await.unwrap().unwrap();
    assert_eq!(stored.state, spendguard_store::ReservationState::Open);
    let letters = g.store().dead_letters().await.unwrap();
    assert!(
        letters.iter().any(|l| l.error.contains("22021")),
        "{letters:?}"
    );
    g.release(bad, None).await.unwrap();
    assert_invariant(&c, Money::parse_usd("2").unwrap()).await;
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_written_by_one_node_keeps_its_spend_when_a_cluster_takes_over() {
    let Some(url) = pg_url() else { return };
    let url = fresh_schema(&url, "takeover").await;
    let dir = tempfile::tempdir().unwrap();
    // A single-node instance spends 1.00 and holds 0.50 open, of the global 2.00.
    let policy = Config::from_toml(CLUSTER_POLICY)
        .unwrap()
        .validate()
        .unwrap();
    let single = AnyStore::open(&url, &OpenOptions::default()).await.unwrap();
    let g = Guard::start(
        single,
        policy,
        GuardOptions::new(dir.path().join("single")),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let spent = g
        .reserve(cents(subject("t", "a"), 100))
        .await
        .unwrap()
        .unwrap();
    g.commit(spent.reservation.id, commit(1_000_000))
        .await
        .unwrap();
    let open = g
        .reserve(cents(subject("t", "b"), 50))
        .await
        .unwrap()
        .unwrap();
    g.shutdown().await;
    drop(g);
    // Two cluster instances take over: 0.50 is left.
    let guards = [
        instance(&url, dir.path(), 0, CLUSTER_POLICY).await,
        instance(&url, dir.path(), 1, CLUSTER_POLICY).await,
    ];
    let mut admitted = 0;
    for i in 0..60 {
        let s = subject(&format!("t{}", i % 3), &format!("c{i}"));
        if guards[i % 2].reserve(cents(s, 1)).await.unwrap().is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, 50,
        "what the single node spent and held still counts"
    );
    // Its open reservation is committed through the cluster: 0.20 of 0.50 charged.
    guards[1]
        .commit(open.reservation.id, commit(200_000))
        .await
        .unwrap();
    let c = Cluster {
        url,
        guards: guards.to_vec(),
        _dir: dir,
    };
    assert_invariant(&c, Money::parse_usd("2").unwrap()).await;
    for g in &c.guards {
        g.shutdown().await;
    }
}

/// Waits (bounded) until no busy scope holds a request's worth (0.01) idle in allowances,
/// which the heartbeats' folds bring about: a request is then decided on all that is free.
async fn wait_until_nothing_idle(g: &Guard<AnyStore>) {
    let pg = g.store().postgres().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = g.ledger().policy().calendar.periods(SystemClock.now());
        let mut idle: std::collections::HashMap<ScopeKey, Money> = Default::default();
        for (_, k, a) in pg.cluster_allowance_list().await.unwrap() {
            let caps = g.ledger().allowance_caps(&k).unwrap_or([None, None]);
            let free = a.at(p.day.start, p.month.start).allowance_free(caps)[0];
            let sum = idle.entry(k).or_default();
            *sum = sum.saturating_add(free.unwrap_or_default().max(Money::ZERO));
        }
        if idle.values().all(|m| *m < Money::from_micros(10_000)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "allowances kept capacity idle: {idle:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reserves 0.01 at a time round robin until refused twice in a row, the second time
/// once no allowance holds capacity idle; returns the admitted.
async fn fill_to_refusal(guards: &[Guard<AnyStore>], tag: &str) -> Vec<Uuid> {
    let mut admitted = Vec::new();
    let mut refused = false;
    for i in 0.. {
        let s = subject(&format!("t{}", i % 7), &format!("{tag}{i}"));
        match guards[i % guards.len()].reserve(cents(s, 1)).await.unwrap() {
            Ok(r) => {
                admitted.push(r.reservation.id);
                refused = false;
            }
            Err(_) if refused => break,
            Err(_) => {
                refused = true;
                wait_until_nothing_idle(&guards[0]).await;
            }
        }
    }
    admitted
}

/// Reserves `n` reservations of 0.01 at once on `g`, each for its own user; returns how
/// many were admitted.
async fn admitted_of(g: &Guard<AnyStore>, tag: &str, n: usize) -> usize {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let g = g.clone();
            let s = subject("t", &format!("{tag}{i}"));
            tokio::spawn(async move { g.reserve(cents(s, 1)).await.unwrap().is_ok() })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    admitted
}

/// An instance that stopped beating its heart while holding an allowance (written here as
/// one that died holding 1.50 of the global 2.00 leaves it) keeps it until its lease
/// lapses: meanwhile only the rest is admitted; then it is taken back and the whole budget
/// is admitted. An instance that stops cleanly gives its allowances back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allowances_of_a_lapsed_instance_come_back_and_a_clean_stop_gives_them_back() {
    let Some(url) = pg_url() else { return };
    let url = fresh_schema(&url, "lapse").await;
    let dir = tempfile::tempdir().unwrap();
    let g = instance_with(&url, dir.path(), 0, CLUSTER_POLICY, |c| {
        c.lease = Duration::from_secs(3);
    })
    .await;
    let p = g.ledger().policy().calendar.periods(SystemClock.now());
    let config: tokio_postgres::Config = url.parse().unwrap();
    let (db, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let dead = Uuid::now_v7();
    db.execute(
        "INSERT INTO cluster_instances (id, name, address, version, started_at, heartbeat_at) \
         VALUES ($1, 'dead', 'nowhere', '0', now(), now())",
        &[&dead],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO scope_counters (scope_kind, tenant_id, scope_id, day_start, month_start, \
         day_granted_micros, month_granted_micros) VALUES ('global', '', 'global', $1, $2, \
         1500000, 1500000) ON CONFLICT (scope_kind, tenant_id, scope_id) DO UPDATE SET \
         day_start = $1, month_start = $2, day_granted_micros = 1500000, \
         month_granted_micros = 1500000",
        &[&p.day.start, &p.month.start],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO cluster_allowances (instance_id, scope_kind, tenant_id, scope_id, \
         day_start, month_start, day_granted_micros, month_granted_micros) \
         VALUES ($1, 'global', '', 'global', $2, $3, 1500000, 1500000)",
        &[&dead, &p.day.start, &p.month.start],
    )
    .await
    .unwrap();
    // While its lease runs, 0.50 is free: 50 of 60 admitted, the others refused by the
    // global budget decided through this instance's allowance.
    assert_eq!(admitted_of(&g, "a", 60).await, 50);
    let stats = g.cluster().unwrap().1;
    assert!(stats.allowance_denials >= 10, "{stats:?}");
    // The capacity was there, idle in the lapsed instance's allowance: false denials.
    assert!(stats.false_denials >= 10, "{stats:?}");
    // Taken back once the lease lapsed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let held: i64 = db
            .query_one(
                "SELECT count(*) FROM cluster_allowances WHERE instance_id = $1",
                &[&dead],
            )
            .await
            .unwrap()
            .get(0);
        if held == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never taken back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(g.cluster().unwrap().1.allowance_reclaims, 1);
    assert_eq!(admitted_of(&g, "b", 160).await, 150);
    let c = Cluster {
        url: url.clone(),
        guards: vec![g.clone()],
        _dir: dir,
    };
    assert_invariant(&c, Money::parse_usd("2").unwrap()).await;
    let stats = g.cluster().unwrap().1;
    assert!(stats.allowance_top_ups > 0, "{stats:?}");
    g.shutdown().await;
    let left: (i64, i64) = {
        let r = db
            .query_one(
                "SELECT (SELECT count(*) FROM cluster_allowances), \
                 (SELECT coalesce(sum(day_granted_micros + month_granted_micros), 0)::int8 \
                 FROM scope_counters)",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(left, (0, 0), "allowances left after a clean stop");
}
