//! Conformance tests of reports, alerts and webhook deliveries: run on every backend by the
//! `conformance!` macro in `main.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;

use spendguard_core::{
    Endpoint, Event, Micros, ModelName, Money, Pricing, RequestStatus, ScopeKey, Tokens,
    UsageRecord, Window,
};
use spendguard_store::{
    AlertKind, AlertQuery, AlertRecord, AnyStore, DeliveryOutcome, DeliveryState, GroupBy,
    ModelUsage, NewAlert, OpenOptions, Report, ReportQuery, ReportRow, Store, StoreError,
    UsageTotals,
};

use spendguard_core::window::week_bucket;

use crate::support::*;

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
const USERS: [&str; 4] = ["u1", "u2", "u3", "u4"];
const COMPANIES: [Option<&str>; 3] = [None, Some("c1"), Some("c2")];
const MODELS: [&str; 3] = ["gpt-4o", "gpt-4o-mini", "claude-3"];
const ENDPOINTS: [Option<&str>; 3] = [None, Some("/v1/chat"), Some("/v1/embed")];
/// The days with usage: 2 to 5 January 2024.
const DAYS: [Micros; 4] = [JAN + DAY, JAN + 2 * DAY, JAN + 3 * DAY, JAN + 4 * DAY];

/// Usage records over several days, tenants, companies (and none), users, models and
/// endpoints (and none); about one in seven expired, with cost and tokens that must not
/// count. Costs are few distinct values, so that groups tie on cost.
fn usage_records(seed: u64, n: usize) -> Vec<UsageRecord> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let day = DAYS[rng.below(DAYS.len() as u64) as usize];
            let mut r = record(50_000 + i as u128);
            r.tenant = tenant(TENANTS[rng.below(3) as usize]);
            r.user = user(USERS[rng.below(4) as usize]);
            r.company = COMPANIES[rng.below(3) as usize].map(company);
            r.model = ModelName::parse(MODELS[rng.below(3) as usize]).unwrap();
            r.endpoint = ENDPOINTS[rng.below(3) as usize].map(|e| Endpoint::parse(e).unwrap());
            r.tokens = Tokens {
                input: rng.below(5_000),
                cached_input: rng.below(500),
                output: rng.below(1_000),
                ..Default::default()
            };
            r.cost = Money::from_micros(1_000 * (1 + rng.below(3) as i64));
            r.status = match rng.below(7) {
                0 => RequestStatus::Expired,
                1 => RequestStatus::Error,
                2 => RequestStatus::Cancelled,
                _ => RequestStatus::Success,
            };
            r.day_start = day;
            r.created_at = day + 1 + i as i64;
            r
        })
        .collect()
}

/// 2023-12-01T00:00:00Z.
const DEC: Micros = JAN - 31 * DAY;
/// 2024-03-01T00:00:00Z (2024 is a leap year).
const MAR: Micros = FEB + 29 * DAY;
/// 2024-04-01T00:00:00Z.
const APR: Micros = MAR + 31 * DAY;
/// 2024-05-01T00:00:00Z.
const MAY: Micros = APR + 30 * DAY;

/// The start of the (UTC) month of `day`, from December 2023 to April 2024.
fn month_of(day: Micros) -> Micros {
    [APR, MAR, FEB, JAN, DEC]
        .into_iter()
        .find(|m| *m <= day)
        .expect("a day from December 2023 on")
}

/// Records like [`usage_records`], on days from 11 December 2023 to 20 April 2024.
fn spread_records(seed: u64, n: usize) -> Vec<UsageRecord> {
    let mut rng = Rng::new(seed ^ 0x5eed);
    usage_records(seed, n)
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            r.id = id(80_000 + i as u128);
            r.day_start = DEC + 10 * DAY + rng.below(132) as i64 * DAY;
            r.month_start = month_of(r.day_start);
            r.created_at = r.day_start + 1 + i as i64;
            r
        })
        .collect()
}

/// A report's first and last day, and whole months within them (`[start, end)`).
type MonthRange = (Micros, Micros, Vec<(Micros, Micros)>);

/// Report ranges over [`spread_records`], each with whole months within it: all of them,
/// some, or none.
fn spread_months() -> Vec<MonthRange> {
    let (jan, feb, mar) = ((JAN, FEB), (FEB, MAR), (MAR, APR));
    vec![
        // 20 December to 5 April: January, February and March are whole.
        (DEC + 19 * DAY, APR + 4 * DAY, vec![jan, feb, mar]),
        (DEC + 19 * DAY, APR + 4 * DAY, vec![feb]),
        (DEC + 19 * DAY, APR + 4 * DAY, vec![jan, mar]),
        (DEC + 19 * DAY, APR + 4 * DAY, vec![]),
        // Exactly January to March.
        (JAN, MAR + 30 * DAY, vec![jan, feb, mar]),
        // Starting, or ending, with a whole month.
        (DEC + DAY, FEB - DAY, vec![jan]),
        (FEB, MAR + 9 * DAY, vec![feb]),
        // Every month whole, the first and the last with days without usage.
        (DEC, MAY - DAY, vec![(DEC, JAN), jan, feb, mar, (APR, MAY)]),
        // One month, alone.
        (FEB, MAR - DAY, vec![feb]),
        // A few days, and one (SQLite reads short ranges through an index, long ones by a
        // scan: both ways are compared).
        (FEB + 10 * DAY, FEB + 12 * DAY, vec![]),
        (MAR + 5 * DAY, MAR + 5 * DAY, vec![]),
    ]
}

/// The report queries over [`spread_months`] with their whole months: every grouping, with
/// and without a tenant, with and without a limit.
fn month_queries(ranges: &[MonthRange]) -> Vec<ReportQuery> {
    let mut out = Vec::new();
    for (from_day, to_day, months) in ranges {
        for group_by in GroupBy::ALL {
            for t in [None, Some("acme"), Some("initech"), Some("nobody")] {
                for limit in [None, Some(2)] {
                    out.push(ReportQuery {
                        from_day: *from_day,
                        to_day: *to_day,
                        tenant: t.map(tenant),
                        group_by,
                        limit,
                        whole_months: months.clone(),
                    });
                }
            }
        }
    }
    out
}

async fn whole_month_reports(store: &AnyStore, ranges: &[MonthRange]) -> Vec<Report> {
    let mut out = Vec::new();
    for q in month_queries(ranges) {
        out.push(store.report(&q).await.unwrap());
    }
    out
}

fn batches(records: &[UsageRecord]) -> Vec<Vec<Event>> {
    records
        .chunks(37)
        .map(|c| c.iter().cloned().map(Event::Recorded).collect())
        .collect()
}

fn one(r: &UsageRecord) -> UsageTotals {
    UsageTotals {
        requests: 1,
        input_tokens: r.tokens.input,
        cached_input_tokens: r.tokens.cached_input,
        output_tokens: r.tokens.output,
        cost: r.cost,
    }
}

/// The report computed the simple way, straight from the records.
fn brute_force(records: &[UsageRecord], q: &ReportQuery) -> Report {
    type Key = (Option<Micros>, Option<String>, Option<String>);
    let mut groups: BTreeMap<Key, UsageTotals> = BTreeMap::new();
    for r in records {
        if !r.counts()
            || r.day_start < q.from_day
            || r.day_start > q.to_day
            || q.tenant.as_ref().is_some_and(|t| *t != r.tenant)
        {
            continue;
        }
        let t = Some(r.tenant.as_str().to_owned());
        let key: Key = match q.group_by {
            GroupBy::Day => (Some(r.day_start), None, None),
            GroupBy::Tenant => (None, t, None),
            GroupBy::Company => (None, t, r.company.as_ref().map(|c| c.as_str().to_owned())),
            GroupBy::User => (None, t, Some(r.user.as_str().to_owned())),
            GroupBy::Model => (None, None, Some(r.model.as_str().to_owned())),
            GroupBy::Endpoint => (
                None,
                None,
                r.endpoint.as_ref().map(|e| e.as_str().to_owned()),
            ),
        };
        groups.entry(key).or_default().add(&one(r));
    }
    let mut totals = UsageTotals::default();
    let mut rows: Vec<ReportRow> = groups
        .into_iter()
        .map(|((day, tenant, key), t)| {
            totals.add(&t);
            ReportRow {
                day,
                tenant,
                key,
                totals: t,
            }
        })
        .collect();
    if q.group_by != GroupBy::Day {
        // Stable: ties stay in (tenant, key) order.
        rows.sort_by_key(|r| std::cmp::Reverse(r.totals.cost));
    }
    let groups = rows.len();
    rows.truncate(q.limit.unwrap_or(usize::MAX));
    Report {
        rows,
        totals,
        groups,
    }
}

fn query(group_by: GroupBy, from_day: Micros, to_day: Micros) -> ReportQuery {
    ReportQuery {
        from_day,
        to_day,
        group_by,
        ..ReportQuery::default()
    }
}

/// The queries the report tests compare: every grouping, all days and some, every tenant
/// and none, with and without limits.
fn queries() -> Vec<ReportQuery> {
    let mut out = Vec::new();
    for g in GroupBy::ALL {
        let all = query(g, DAYS[0], DAYS[3]);
        out.push(all.clone());
        // Inclusive bounds: the middle two days.
        out.push(query(g, DAYS[1], DAYS[2]));
        out.push(query(g, DAYS[2], DAYS[2]));
        // Bounds between days count the whole days within.
        out.push(query(g, DAYS[0] + 1, DAYS[2] - 1));
        out.push(query(g, i64::MIN, i64::MAX));
        // No usage.
        out.push(query(g, FEB, FEB + 10 * DAY));
        for limit in [0, 1, 2, 5] {
            out.push(ReportQuery {
                limit: Some(limit),
                ..all.clone()
            });
        }
        for t in TENANTS.iter().chain(&["nobody"]) {
            out.push(ReportQuery {
                tenant: Some(tenant(t)),
                ..all.clone()
            });
            out.push(ReportQuery {
                tenant: Some(tenant(t)),
                limit: Some(2),
                ..query(g, DAYS[1], DAYS[3])
            });
        }
    }
    out
}

async fn all_reports(store: &AnyStore) -> Vec<Report> {
    let mut out = Vec::new();
    for q in queries() {
        out.push(store.report(&q).await.unwrap());
    }
    for t in TENANTS {
        for u in USERS {
            for day in DAYS {
                let models = store.user_day(&tenant(t), &user(u), day).await.unwrap();
                out.push(Report {
                    rows: models
                        .into_iter()
                        .map(|m| ReportRow {
                            day: Some(day),
                            tenant: Some(t.into()),
                            key: Some(m.model),
                            totals: m.totals,
                        })
                        .collect(),
                    ..Report::default()
                });
            }
        }
    }
    out
}

pub async fn reports_match_a_brute_force_sum(db: &Db) {
    let store = db.store().await;
    let records = usage_records(0xa11ce, 400);
    for batch in batches(&records) {
        store.apply(&batch).await.unwrap();
    }
    for q in queries() {
        let report = store.report(&q).await.unwrap();
        assert_eq!(report, brute_force(&records, &q), "{q:?}");
        assert!(report.rows.len() <= q.limit.unwrap_or(usize::MAX));
    }
    // Spot checks of the brute force itself: every grouping sums to the same totals, which
    // count only the records that count.
    let counting: Vec<&UsageRecord> = records.iter().filter(|r| r.counts()).collect();
    let expired = records.len() - counting.len();
    assert!(expired > 20, "the data has expired records ({expired})");
    let mut sum = UsageTotals::default();
    for r in &counting {
        sum.add(&one(r));
    }
    for g in GroupBy::ALL {
        let report = store.report(&query(g, DAYS[0], DAYS[3])).await.unwrap();
        assert_eq!(report.totals, sum, "{g:?}");
        assert_eq!(report.totals.requests, counting.len() as u64);
    }
    let days = store
        .report(&query(GroupBy::Day, DAYS[0], DAYS[3]))
        .await
        .unwrap();
    assert_eq!(days.groups, 4);
    assert!(days.rows.windows(2).all(|w| w[0].day < w[1].day));
    assert!(
        days.rows
            .iter()
            .all(|r| r.tenant.is_none() && r.key.is_none())
    );
    // Groups without a company or endpoint have no key; company groups have a tenant.
    let companies = store
        .report(&query(GroupBy::Company, DAYS[0], DAYS[3]))
        .await
        .unwrap();
    assert_eq!(companies.groups, 9);
    assert_eq!(companies.rows.iter().filter(|r| r.key.is_none()).count(), 3);
    assert!(companies.rows.iter().all(|r| r.tenant.is_some()));
    let endpoints = store
        .report(&query(GroupBy::Endpoint, DAYS[0], DAYS[3]))
        .await
        .unwrap();
    assert_eq!(endpoints.groups, 3);
    assert!(endpoints.rows.iter().any(|r| r.key.is_none()));
    assert!(endpoints.rows.iter().all(|r| r.tenant.is_none()));
    assert!(
        endpoints
            .rows
            .windows(2)
            .all(|w| w[0].totals.cost >= w[1].totals.cost)
    );
    let users = store
        .report(&ReportQuery {
            limit: Some(3),
            ..query(GroupBy::User, DAYS[0], DAYS[3])
        })
        .await
        .unwrap();
    assert_eq!(users.groups, 12);
    assert_eq!(users.rows.len(), 3);
    assert_eq!(users.totals, sum);
    // A tenant's report holds only that tenant.
    let acme = store
        .report(&ReportQuery {
            tenant: Some(tenant("acme")),
            ..query(GroupBy::User, DAYS[0], DAYS[3])
        })
        .await
        .unwrap();
    assert_eq!(acme.groups, 4);
    assert!(
        acme.rows
            .iter()
            .all(|r| r.tenant.as_deref() == Some("acme"))
    );
}

pub async fn user_day_sums_per_model(db: &Db) {
    let store = db.store().await;
    let day = JAN + 9 * DAY;
    let make = |n: u128, model: &str, cost: i64, input: u64| {
        let mut r = record(n);
        r.model = ModelName::parse(model).unwrap();
        r.cost = Money::from_micros(cost);
        r.tokens = Tokens {
            input,
            cached_input: input / 10,
            output: input / 2,
            ..Default::default()
        };
        r
    };
    let mut records = vec![
        make(1, "gpt-4o", 5_000, 100),
        make(2, "gpt-4o", 7_000, 200),
        make(3, "claude-3", 12_000, 300),
        // Ties with claude-3 on cost: sorted by model.
        make(4, "b-model", 12_000, 10),
        make(5, "gpt-4o-mini", 1, 1),
    ];
    // Noise: an expired record, another user, another tenant, another day.
    let mut gone = make(6, "gpt-4o", 1_000_000, 1_000);
    gone.status = RequestStatus::Expired;
    let mut bob = make(7, "gpt-4o", 3, 3);
    bob.user = user("bob");
    let mut other = make(8, "gpt-4o", 3, 3);
    other.tenant = tenant("globex");
    let mut later = make(9, "gpt-4o", 3, 3);
    later.day_start = day + DAY;
    records.extend([gone, bob, other, later]);
    store
        .apply(
            &records
                .iter()
                .cloned()
                .map(Event::Recorded)
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let totals = |requests, input: u64, cost| UsageTotals {
        requests,
        input_tokens: input,
        cached_input_tokens: input / 10,
        output_tokens: input / 2,
        cost: Money::from_micros(cost),
    };
    let got = store
        .user_day(&tenant("acme"), &user("alice"), day)
        .await
        .unwrap();
    let want = vec![
        ModelUsage {
            model: "b-model".into(),
            totals: totals(1, 10, 12_000),
        },
        ModelUsage {
            model: "claude-3".into(),
            totals: totals(1, 300, 12_000),
        },
        ModelUsage {
            model: "gpt-4o".into(),
            totals: UsageTotals {
                requests: 2,
                input_tokens: 300,
                cached_input_tokens: 30,
                output_tokens: 150,
                cost: Money::from_micros(12_000),
            },
        },
        ModelUsage {
            model: "gpt-4o-mini".into(),
            totals: totals(1, 1, 1),
        },
    ];
    // gpt-4o ties at 12,000 too (5,000 + 7,000).
    assert_eq!(got, want);
    assert_eq!(
        store
            .user_day(&tenant("acme"), &user("bob"), day)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        store
            .user_day(&tenant("acme"), &user("alice"), day - DAY)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .user_day(&tenant("initech"), &user("alice"), day)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn reapplying_leaves_usage_rollups_unchanged(db: &Db) {
    let store = db.store().await;
    let records = usage_records(0xbee, 200);
    let batches = batches(&records);
    for batch in &batches {
        store.apply(batch).await.unwrap();
    }
    let first = all_reports(&store).await;
    // Every batch again, then overlapping and reversed pieces of them, then one record per
    // batch: nothing changes.
    for batch in &batches {
        store.apply(batch).await.unwrap();
    }
    let all: Vec<Event> = batches.iter().flatten().cloned().collect();
    store.apply(&all[50..150]).await.unwrap();
    let mut reversed = all.clone();
    reversed.reverse();
    store.apply(&reversed).await.unwrap();
    for event in all.iter().step_by(17) {
        store.apply(std::slice::from_ref(event)).await.unwrap();
    }
    assert_eq!(all_reports(&store).await, first);
    assert_eq!(store.usage_count().await.unwrap(), records.len() as u64);
    // The maintained rows equal the ones recomputed from `ai_usage`.
    store.rebuild_usage_rollups().await.unwrap();
    assert_eq!(all_reports(&store).await, first);
    // A batch repeating a record within itself counts it once.
    let mut extra = record(900);
    extra.day_start = DAYS[0];
    store
        .apply(&[Event::Recorded(extra.clone()), Event::Recorded(extra)])
        .await
        .unwrap();
    let mut records = records;
    records.push({
        let mut r = record(900);
        r.day_start = DAYS[0];
        r
    });
    for q in queries() {
        assert_eq!(store.report(&q).await.unwrap(), brute_force(&records, &q));
    }
}

pub async fn usage_rollups_saturate(db: &Db) {
    let store = db.store().await;
    let mut huge = record(1);
    huge.cost = Money::from_micros(i64::MAX - 10);
    huge.tokens = Tokens {
        input: i64::MAX as u64,
        cached_input: u64::MAX,
        output: 7,
        ..Default::default()
    };
    let mut more = record(2);
    more.cost = Money::from_micros(100);
    // In one batch and in two.
    store
        .apply(&[Event::Recorded(huge), Event::Recorded(more)])
        .await
        .unwrap();
    let mut third = record(3);
    third.cost = Money::from_micros(i64::MAX / 2);
    store.apply(&[Event::Recorded(third)]).await.unwrap();
    let want = UsageTotals {
        requests: 3,
        input_tokens: i64::MAX as u64,
        cached_input_tokens: i64::MAX as u64,
        output_tokens: 7 + 2 * 300,
        cost: Money::MAX,
    };
    for g in GroupBy::ALL {
        let report = store.report(&query(g, i64::MIN, i64::MAX)).await.unwrap();
        assert_eq!(report.totals, want, "{g:?}");
    }
    let before = all_reports(&store).await;
    store.rebuild_usage_rollups().await.unwrap();
    assert_eq!(all_reports(&store).await, before);
    // Migration 2 fills the token split of the rollups saturated too.
    let rollups = store.rollups().await.unwrap();
    assert!(
        rollups
            .iter()
            .all(|r| r.input_tokens == i64::MAX as u64 && r.cached_input_tokens == i64::MAX as u64)
    );
    store.close().await;
    let store = back_to_schema_1(db).await;
    assert_eq!(store.rollups().await.unwrap(), rollups);
    assert_eq!(all_reports(&store).await, before);
}

pub async fn migration_2_backfills_usage_rollups(db: &Db) {
    let store = db.store().await;
    let mut records = usage_records(0xfeed, 300);
    records.extend(spread_records(0xfeed, 300));
    for batch in batches(&records) {
        store.apply(&batch).await.unwrap();
    }
    let before = all_reports(&store).await;
    assert!(before.iter().any(|r| !r.rows.is_empty()));
    let rollups = store.rollups().await.unwrap();
    assert!(
        rollups
            .iter()
            .all(|r| r.input_tokens > 0 && r.output_tokens > 0)
    );
    assert!(rollups.iter().any(|r| r.cached_input_tokens > 0));
    let months = spread_months();
    let month_reports = whole_month_reports(&store, &months).await;
    store.close().await;
    let store = back_to_schema_1(db).await;
    // The token split is back in every rollup row, as maintained before.
    assert_eq!(store.rollups().await.unwrap(), rollups);
    assert_eq!(store.recount().await.unwrap(), rollups);
    assert_eq!(all_reports(&store).await, before);
    assert_eq!(whole_month_reports(&store, &months).await, month_reports);
    for q in queries() {
        assert_eq!(store.report(&q).await.unwrap(), brute_force(&records, &q));
    }
}

pub async fn whole_months_read_like_their_days(db: &Db) {
    let store = db.store().await;
    let records = spread_records(0x3011, 900);
    for batch in batches(&records) {
        store.apply(&batch).await.unwrap();
    }
    // The data: every month, expired records, usage without a company.
    for month in [DEC, JAN, FEB, MAR, APR] {
        assert!(records.iter().any(|r| r.month_start == month && r.counts()));
    }
    assert!(records.iter().any(|r| !r.counts()));
    assert!(records.iter().any(|r| r.company.is_none() && r.counts()));
    let ranges = spread_months();
    let mut read_months = 0;
    for q in month_queries(&ranges) {
        let with = store.report(&q).await.unwrap();
        let days = ReportQuery {
            whole_months: Vec::new(),
            ..q.clone()
        };
        assert_eq!(with, store.report(&days).await.unwrap(), "{q:?}");
        assert_eq!(with, brute_force(&records, &q), "{q:?}");
        if !q.whole_months.is_empty() && with.groups > 0 {
            read_months += 1;
        }
    }
    assert!(read_months > 100, "{read_months}");

    // The month rows are what is read: a (tampered) February row shows in the reports that
    // take February whole, and only in those.
    let (from_day, to_day) = (JAN, MAR + 30 * DAY);
    let users = |whole_months| ReportQuery {
        from_day,
        to_day,
        group_by: GroupBy::User,
        whole_months,
        ..ReportQuery::default()
    };
    let before = store.report(&users(Vec::new())).await.unwrap();
    execute(
        db,
        &format!(
            "UPDATE rollups SET requests = requests + 1000 WHERE scope_kind = 'user' \
             AND \"window\" = 'month' AND window_start = {FEB}"
        ),
    )
    .await;
    let february_users = records
        .iter()
        .filter(|r| r.counts() && r.month_start == FEB)
        .map(|r| (r.tenant.clone(), r.user.clone()))
        .collect::<std::collections::HashSet<_>>()
        .len() as u64;
    assert!(february_users > 5, "{february_users}");
    assert_eq!(store.report(&users(Vec::new())).await.unwrap(), before);
    assert_eq!(
        store.report(&users(vec![(JAN, FEB)])).await.unwrap(),
        before
    );
    let tampered = store.report(&users(vec![(FEB, MAR)])).await.unwrap();
    assert_eq!(
        tampered.totals.requests,
        before.totals.requests + 1000 * february_users
    );

    // Whole months out of order, overlapping or outside the days are refused.
    for months in [
        vec![(FEB, MAR), (JAN, FEB)],
        vec![(JAN, MAR), (FEB, MAR)],
        vec![(DEC, JAN)],
        vec![(APR, MAY)],
        vec![(FEB, FEB)],
    ] {
        for group_by in [GroupBy::Tenant, GroupBy::Company, GroupBy::User] {
            let q = ReportQuery {
                group_by,
                ..users(months.clone())
            };
            assert!(
                matches!(store.report(&q).await, Err(StoreError::Invalid(_))),
                "{q:?}"
            );
        }
    }
}

/// Reports of users over ranges of days read each seven-day bucket the range covers whole
/// from its week row (migration 12): they equal a brute-force sum of the records over many
/// ranges, and a (tampered) week row shows in exactly the reports whose ranges cover it.
pub async fn user_reports_read_whole_weeks_from_week_rows(db: &Db) {
    let store = db.store().await;
    let records = spread_records(0x3e3e, 900);
    for batch in batches(&records) {
        store.apply(&batch).await.unwrap();
    }
    let first = DEC + 10 * DAY;
    let mut compared = 0;
    for from in (0..40).step_by(3) {
        for len in [0, 5, 6, 7, 8, 13, 14, 20, 29, 30, 45, 90] {
            let (from_day, to_day) = (first + from * DAY, first + (from + len) * DAY);
            for tenant_filter in [None, Some(tenant(TENANTS[1]))] {
                for limit in [None, Some(3)] {
                    let q = ReportQuery {
                        tenant: tenant_filter.clone(),
                        limit,
                        ..query(GroupBy::User, from_day, to_day)
                    };
                    let report = store.report(&q).await.unwrap();
                    assert_eq!(report, brute_force(&records, &q), "{q:?}");
                    compared += usize::from(report.groups > 0);
                }
            }
        }
    }
    assert!(compared > 500, "{compared}");

    // The week rows are what is read: bump one bucket's rows, then only the ranges that
    // cover that bucket whole show it.
    let bucket = week_bucket(JAN + 20 * DAY);
    execute(
        db,
        &format!(
            "UPDATE rollups SET requests = requests + 1000 WHERE scope_kind = 'user' \
             AND \"window\" = 'week' AND window_start = {bucket}"
        ),
    )
    .await;
    let users_in_bucket = records
        .iter()
        .filter(|r| r.counts() && week_bucket(r.day_start) == bucket)
        .map(|r| (r.tenant.clone(), r.user.clone()))
        .collect::<std::collections::HashSet<_>>()
        .len() as u64;
    assert!(users_in_bucket > 5, "{users_in_bucket}");
    let bucket_end = bucket + 7 * DAY;
    for (from_day, to_day, covered) in [
        // Day starts are midnight UTC here, so the bucket's days are its seven midnights.
        (bucket, bucket_end, true),
        (bucket - 3 * DAY, bucket_end + 10 * DAY, true),
        (bucket + DAY, bucket_end + 10 * DAY, false),
        // The last day's start is all a report knows of its end: a range ending with the
        // bucket's last day reads that day from its day row.
        (bucket - 3 * DAY, bucket_end - DAY, false),
    ] {
        let q = query(GroupBy::User, from_day, to_day);
        let report = store.report(&q).await.unwrap();
        let expected = brute_force(&records, &q).totals.requests;
        let extra = if covered { 1000 * users_in_bucket } else { 0 };
        assert_eq!(report.totals.requests, expected + extra, "{q:?}");
    }
}

/// Takes the database back to the schema of version 1 (keeping the usage and rollup rows),
/// then opens a store on it, which applies migration 2 (and those after it) again.
/// Migration 5 (the gateway's columns, status `truncated`) keeps every record and every
/// rollup of a database at version 4; on SQLite it rebuilds `ai_usage`.
pub async fn migration_5_keeps_every_record(db: &Db) {
    let store = db.store().await;
    let records = usage_records(0x5005, 200);
    for batch in batches(&records) {
        store.apply(&batch).await.unwrap();
    }
    let rollups = store.rollups().await.unwrap();
    let before = all_reports(&store).await;
    store.close().await;
    let sql = match db {
        Db::Sqlite { .. } => {
            "CREATE TABLE ai_usage_v4 AS SELECT id, user_id, company_id, tenant_id, model, \
             endpoint, subscription_tier, input_tokens, cached_input_tokens, output_tokens, \
             cost_micros, request_status, created_at, reservation_id, idempotency_key, \
             day_start, month_start, pricing FROM ai_usage; \
             DROP TABLE ai_usage; ALTER TABLE ai_usage_v4 RENAME TO ai_usage; \
             DROP TABLE tenant_prices; \
             DELETE FROM schema_migrations WHERE version IN (5, 10)"
        }
        Db::Postgres { .. } => {
            "ALTER TABLE ai_usage DROP COLUMN upstream, DROP COLUMN provider_request_id, \
             DROP CONSTRAINT ai_usage_request_status_check, \
             ADD CONSTRAINT ai_usage_request_status_check \
             CHECK (request_status IN ('success', 'error', 'cancelled', 'expired')); \
             DELETE FROM schema_migrations WHERE version = 5"
        }
    };
    execute(db, sql).await;
    let store = reopen(db).await;
    assert_eq!(store.schema_versions().await.unwrap(), all_versions());
    assert_eq!(store.usage_count().await.unwrap(), records.len() as u64);
    for r in &records {
        assert_eq!(store.usage(r.id).await.unwrap().as_ref(), Some(r));
    }
    assert_eq!(store.rollups().await.unwrap(), rollups);
    assert_eq!(store.recount().await.unwrap(), rollups);
    assert_eq!(all_reports(&store).await, before);
}

/// Migration 10 (token kinds, the `config` and `tenant_override` pricings, tenants' prices)
/// keeps every record and rollup of a database at version 9; on SQLite it rebuilds
/// `ai_usage`. Records written after it keep their token kinds and pricing.
pub async fn migration_10_keeps_every_record(db: &Db) {
    let store = db.store().await;
    let records = usage_records(0x1010, 200);
    for batch in batches(&records) {
        store.apply(&batch).await.unwrap();
    }
    let rollups = store.rollups().await.unwrap();
    let before = all_reports(&store).await;
    store.close().await;
    let sql = match db {
        Db::Sqlite { .. } => {
            "CREATE TABLE ai_usage_v9 AS SELECT id, user_id, company_id, tenant_id, model, \
             endpoint, subscription_tier, input_tokens, cached_input_tokens, output_tokens, \
             cost_micros, request_status, created_at, reservation_id, idempotency_key, \
             day_start, month_start, pricing, upstream, provider_request_id FROM ai_usage; \
             DROP TABLE ai_usage; ALTER TABLE ai_usage_v9 RENAME TO ai_usage; \
             DROP TABLE tenant_prices; \
             DELETE FROM schema_migrations WHERE version = 10"
        }
        Db::Postgres { .. } => {
            "ALTER TABLE ai_usage DROP COLUMN cache_creation_input_tokens, \
             DROP COLUMN cache_creation_1h_input_tokens, DROP COLUMN reasoning_tokens, \
             DROP COLUMN long_context_above, DROP CONSTRAINT ai_usage_pricing_check, \
             ADD CONSTRAINT ai_usage_pricing_check \
             CHECK (pricing IN ('catalog', 'caller', 'estimate', 'default', 'free')); \
             DROP TABLE tenant_prices; \
             DELETE FROM schema_migrations WHERE version = 10"
        }
    };
    execute(db, sql).await;
    let store = reopen(db).await;
    assert_eq!(store.schema_versions().await.unwrap(), all_versions());
    assert_eq!(store.usage_count().await.unwrap(), records.len() as u64);
    for r in &records {
        assert_eq!(store.usage(r.id).await.unwrap().as_ref(), Some(r));
    }
    assert_eq!(store.rollups().await.unwrap(), rollups);
    assert_eq!(store.recount().await.unwrap(), rollups);
    assert_eq!(all_reports(&store).await, before);
    // The new columns and pricings take new records.
    let mut r = record(90_001);
    r.tokens = Tokens {
        input: 10_000,
        cached_input: 1_000,
        output: 500,
        cache_creation: 2_000,
        cache_creation_1h: 500,
        reasoning: 200,
    };
    r.pricing = Pricing::TenantOverride;
    r.long_context_above = Some(200_000);
    store.apply(&[Event::Recorded(r.clone())]).await.unwrap();
    assert_eq!(store.usage(r.id).await.unwrap(), Some(r));
}

async fn back_to_schema_1(db: &Db) -> AnyStore {
    execute(
        db,
        "DROP TABLE usage_rollups; DROP INDEX webhook_deliveries_alert_url; \
         ALTER TABLE webhook_deliveries DROP COLUMN delivered_at; \
         DROP INDEX IF EXISTS rollups_kind_window; \
         ALTER TABLE rollups DROP COLUMN input_tokens; \
         ALTER TABLE rollups DROP COLUMN cached_input_tokens; \
         ALTER TABLE rollups DROP COLUMN output_tokens; \
         ALTER TABLE ai_usage DROP COLUMN pricing; \
         DROP INDEX reservations_idempotency; DROP TABLE settings; \
         DELETE FROM rollups WHERE \"window\" = 'week'; \
         DELETE FROM schema_migrations WHERE version IN (2, 3, 12)",
    )
    .await;
    let store = reopen(db).await;
    assert_eq!(store.schema_versions().await.unwrap(), all_versions());
    store
}

async fn reopen(db: &Db) -> AnyStore {
    for _ in 0..100 {
        match db.open(&OpenOptions::default()).await {
            Ok(store) => return store,
            Err(StoreError::Locked(_)) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => panic!("reopening failed: {e}"),
        }
    }
    panic!("the writer lock was not released");
}

fn alert(scope: ScopeKey, window: Window, window_start: Micros, created_at: Micros) -> NewAlert {
    NewAlert {
        scope,
        window,
        window_start,
        threshold_percent: 80,
        kind: AlertKind::Threshold,
        amount: Money::from_micros(8_000_000),
        limit: Money::from_micros(10_000_000),
        created_at,
    }
}

pub async fn alerts_are_inserted_exactly_once(db: &Db) {
    let store = Arc::new(db.store().await);
    // Another instance on the same database (it does not write usage).
    let other = Arc::new(
        db.open(&OpenOptions {
            take_writer_lock: false,
            ..OpenOptions::default()
        })
        .await
        .unwrap(),
    );
    let day = JAN + 9 * DAY;
    let tenant_day = alert(ScopeKey::Tenant(tenant("acme")), Window::Day, day, day + 5);
    let global_month = NewAlert {
        threshold_percent: 100,
        kind: AlertKind::Projected,
        amount: Money::from_micros(123_456_789),
        ..alert(ScopeKey::Global, Window::Month, JAN, day + 6)
    };
    let urls = vec![
        "https://a.example/hook".to_string(),
        "https://b.example/hook".to_string(),
    ];
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = if t % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        let mut alerts = vec![tenant_day.clone(), global_month.clone()];
        if t % 4 >= 2 {
            alerts.reverse();
        }
        let urls = urls.clone();
        tasks.push(tokio::spawn(async move {
            store.insert_alerts(&alerts, &urls).await.unwrap()
        }));
    }
    let mut got: Vec<AlertRecord> = Vec::new();
    for task in tasks {
        got.extend(task.await.unwrap());
    }
    assert_eq!(got.len(), 2, "{got:?}");
    let tenant_rec = got.iter().find(|r| r.alert == tenant_day).unwrap().clone();
    let global_rec = got
        .iter()
        .find(|r| r.alert == global_month)
        .unwrap()
        .clone();
    assert_ne!(tenant_rec.id, global_rec.id);

    // One pending delivery per alert and URL, due at once.
    let deliveries = store.deliveries().await.unwrap();
    assert_eq!(deliveries.len(), 4);
    assert!(deliveries.windows(2).all(|w| w[0].id < w[1].id));
    for rec in [&tenant_rec, &global_rec] {
        let mine: Vec<_> = deliveries.iter().filter(|d| d.alert == *rec).collect();
        let mut mine_urls: Vec<&str> = mine.iter().map(|d| d.url.as_str()).collect();
        mine_urls.sort_unstable();
        assert_eq!(
            mine_urls,
            ["https://a.example/hook", "https://b.example/hook"]
        );
        for d in mine {
            assert_eq!(d.state, DeliveryState::Pending);
            assert_eq!(d.attempts, 0);
            assert_eq!(d.next_attempt_at, Some(rec.alert.created_at));
            assert_eq!(d.delivered_at, None);
            assert_eq!(d.last_error, None);
        }
    }
    // Later inserts of the same alerts do nothing; a new threshold is a new alert.
    let ninety = NewAlert {
        threshold_percent: 90,
        ..tenant_day.clone()
    };
    let again = store
        .insert_alerts(&[global_month.clone(), ninety.clone(), tenant_day], &urls)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].alert, ninety);
    assert_eq!(store.deliveries().await.unwrap().len(), 6);
    // Without webhooks, alerts are still recorded (and nothing is to deliver).
    let quiet = NewAlert {
        kind: AlertKind::Projected,
        ..ninety
    };
    assert_eq!(store.insert_alerts(&[quiet], &[]).await.unwrap().len(), 1);
    assert_eq!(store.deliveries().await.unwrap().len(), 6);
    assert!(store.insert_alerts(&[], &urls).await.unwrap().is_empty());
    assert_eq!(store.alerts(&AlertQuery::default()).await.unwrap().len(), 4);
}

/// The alerts listed, as indexes into `alerts`.
async fn listed(store: &AnyStore, alerts: &[NewAlert], q: AlertQuery) -> Vec<usize> {
    store
        .alerts(&q)
        .await
        .unwrap()
        .into_iter()
        .map(|r| alerts.iter().position(|a| *a == r.alert).unwrap())
        .collect()
}

pub async fn alerts_list_newest_first_with_filters(db: &Db) {
    let store = db.store().await;
    let today = JAN + 9 * DAY;
    let month = JAN;
    let acme = || tenant("acme");
    let t0 = today + 1_000;
    let alerts = [
        // 0: global, today.
        alert(ScopeKey::Global, Window::Day, today, t0 + 1),
        // 1: acme, yesterday.
        alert(ScopeKey::Tenant(acme()), Window::Day, today - DAY, t0 + 2),
        // 2: acme's company, this month.
        alert(
            ScopeKey::Company(acme(), company("eng")),
            Window::Month,
            month,
            t0 + 3,
        ),
        // 3: another tenant's user, today.
        alert(
            ScopeKey::User(tenant("globex"), user("u1")),
            Window::Day,
            today,
            t0 + 4,
        ),
        // 4: acme, last month.
        alert(
            ScopeKey::Tenant(acme()),
            Window::Month,
            month - 31 * DAY,
            t0 + 5,
        ),
        // 5: acme's user, today, raised at the same time as 2 (inserted after it).
        NewAlert {
            kind: AlertKind::Projected,
            threshold_percent: 100,
            ..alert(
                ScopeKey::User(acme(), user("alice")),
                Window::Day,
                today,
                t0 + 3,
            )
        },
    ];
    for a in &alerts {
        assert_eq!(
            store
                .insert_alerts(std::slice::from_ref(a), &[])
                .await
                .unwrap()
                .len(),
            1
        );
    }
    assert_eq!(
        listed(&store, &alerts, AlertQuery::default()).await,
        [4, 3, 5, 2, 1, 0]
    );
    let of_acme = AlertQuery {
        tenant: Some(acme()),
        ..AlertQuery::default()
    };
    assert_eq!(listed(&store, &alerts, of_acme.clone()).await, [4, 5, 2, 1]);
    let current = AlertQuery {
        current: Some((today, month)),
        ..AlertQuery::default()
    };
    assert_eq!(listed(&store, &alerts, current.clone()).await, [3, 5, 2, 0]);
    assert_eq!(
        listed(
            &store,
            &alerts,
            AlertQuery {
                current: Some((today, month)),
                ..of_acme.clone()
            }
        )
        .await,
        [5, 2]
    );
    assert_eq!(
        listed(
            &store,
            &alerts,
            AlertQuery {
                limit: Some(2),
                ..AlertQuery::default()
            }
        )
        .await,
        [4, 3]
    );
    assert_eq!(
        listed(
            &store,
            &alerts,
            AlertQuery {
                limit: Some(0),
                ..current
            }
        )
        .await,
        Vec::<usize>::new()
    );
    assert_eq!(
        listed(
            &store,
            &alerts,
            AlertQuery {
                tenant: Some(tenant("globex")),
                ..AlertQuery::default()
            }
        )
        .await,
        [3]
    );
    assert!(
        listed(
            &store,
            &alerts,
            AlertQuery {
                tenant: Some(tenant("nobody")),
                ..AlertQuery::default()
            }
        )
        .await
        .is_empty()
    );
    // Ids ascend in insertion order; the records round-trip.
    let all = store.alerts(&AlertQuery::default()).await.unwrap();
    let id_of = |i: usize| all.iter().find(|r| r.alert == alerts[i]).unwrap().id;
    assert!(id_of(2) < id_of(5));
}

pub async fn deliveries_move_through_their_states(db: &Db) {
    let store = db.store().await;
    let created = JAN + 9 * DAY + 1_000;
    let a = alert(
        ScopeKey::Tenant(tenant("acme")),
        Window::Day,
        JAN + 9 * DAY,
        created,
    );
    let urls: Vec<String> = [
        "https://one.example",
        "https://two.example",
        "https://three.example",
    ]
    .map(String::from)
    .to_vec();
    let rec = store
        .insert_alerts(std::slice::from_ref(&a), &urls)
        .await
        .unwrap()
        .remove(0);
    assert!(
        store
            .due_deliveries(created - 1, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let due = store.due_deliveries(created, 10).await.unwrap();
    assert_eq!(due.len(), 3);
    assert!(due.iter().all(|d| d.alert == rec));
    assert_eq!(store.due_deliveries(created, 2).await.unwrap(), due[..2]);
    let (one, two, three) = (due[0].id, due[1].id, due[2].id);
    assert!(one < two && two < three);

    // One fails and is retried later; one is delivered; one fails for good.
    store
        .finish_delivery(
            one,
            &DeliveryOutcome::Retry {
                next_attempt_at: created + 60_000_000,
                error: "HTTP 503".into(),
            },
        )
        .await
        .unwrap();
    store
        .finish_delivery(two, &DeliveryOutcome::Delivered { at: created + 10 })
        .await
        .unwrap();
    store
        .finish_delivery(
            three,
            &DeliveryOutcome::Failed {
                error: "connection refused".into(),
            },
        )
        .await
        .unwrap();
    assert!(store.due_deliveries(created, 10).await.unwrap().is_empty());
    assert!(
        store
            .due_deliveries(created + 59_999_999, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let due = store
        .due_deliveries(created + 60_000_000, 10)
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].id, one);
    assert_eq!(due[0].state, DeliveryState::Pending);
    assert_eq!(due[0].attempts, 1);
    assert_eq!(due[0].last_error.as_deref(), Some("HTTP 503"));
    // Far in the future, only the retried one is due.
    assert_eq!(store.due_deliveries(i64::MAX, 10).await.unwrap(), due);

    // The retry succeeds.
    store
        .finish_delivery(
            one,
            &DeliveryOutcome::Delivered {
                at: created + 60_000_500,
            },
        )
        .await
        .unwrap();
    assert!(store.due_deliveries(i64::MAX, 10).await.unwrap().is_empty());
    let all = store.deliveries().await.unwrap();
    assert_eq!(
        all.iter().map(|d| d.id).collect::<Vec<_>>(),
        [one, two, three]
    );
    let summary: Vec<_> = all
        .iter()
        .map(|d| {
            (
                d.url.as_str(),
                d.state,
                d.attempts,
                d.next_attempt_at,
                d.delivered_at,
                d.last_error.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "https://one.example",
                DeliveryState::Delivered,
                2,
                None,
                Some(created + 60_000_500),
                Some("HTTP 503"),
            ),
            (
                "https://two.example",
                DeliveryState::Delivered,
                1,
                None,
                Some(created + 10),
                None,
            ),
            (
                "https://three.example",
                DeliveryState::Failed,
                1,
                None,
                None,
                Some("connection refused"),
            ),
        ]
    );
    assert!(all.iter().all(|d| d.alert == rec));
    // An unknown delivery is refused.
    assert!(matches!(
        store
            .finish_delivery(three + 100, &DeliveryOutcome::Failed { error: "x".into() })
            .await,
        Err(StoreError::Invalid(_))
    ));
}

/// Reservations admitted that a limit in shadow would have refused are counted by reason,
/// once each however often their events are applied, within the days and tenant asked.
pub async fn would_deny_is_counted_once_per_reservation(db: &Db) {
    let store = db.store().await;
    let mut events = Vec::new();
    for (n, reason, tenant_id) in [
        (1, Some("budget_exceeded"), "acme"),
        (2, Some("budget_exceeded"), "acme"),
        (3, Some("rate_limited"), "acme"),
        (4, Some("budget_exceeded"), "globex"),
        (5, None, "acme"),
    ] {
        let mut r = reservation(n);
        r.would_deny = reason.map(str::to_owned);
        r.subject.tenant = tenant(tenant_id);
        events.push(spendguard_core::Event::Reserved(r));
    }
    store.apply(&events).await.unwrap();
    // Again, and one by one: nothing more is counted.
    store.apply(&events).await.unwrap();
    for e in &events {
        store.apply(std::slice::from_ref(e)).await.unwrap();
    }
    let day = JAN + 9 * DAY;
    let all = store.would_deny_counts(JAN, day, None).await.unwrap();
    assert_eq!(
        all,
        vec![
            ("budget_exceeded".to_owned(), 3),
            ("rate_limited".to_owned(), 1)
        ]
    );
    let acme = store
        .would_deny_counts(day, day, Some(&tenant("acme")))
        .await
        .unwrap();
    assert_eq!(
        acme,
        vec![
            ("budget_exceeded".to_owned(), 2),
            ("rate_limited".to_owned(), 1)
        ]
    );
    // Days before the reservations: none.
    assert!(
        store
            .would_deny_counts(JAN, day - DAY, None)
            .await
            .unwrap()
            .is_empty()
    );
}
