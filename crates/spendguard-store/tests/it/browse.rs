//! The dashboard's reads and writes: records of a scope newest first and paged, their sums
//! per day, model and endpoint (against a brute-force sum), the rollups' day rows, the audit
//! log and alert acknowledgements.

use std::collections::BTreeMap;

use spendguard_core::{
    Endpoint, Event, ModelName, Money, RequestStatus, ScopeKey, UsageRecord, Window,
};
use spendguard_store::{
    AlertKind, AuditEntry, DaySlice, NewAlert, RecordQuery, SliceDim, Store, UsageTotals,
};

use crate::support::*;

/// 60 records over 3 days, 2 tenants, 3 users, 2 models, 2 endpoints (one `None`), one of
/// them expired.
fn records() -> Vec<UsageRecord> {
    (0..60u128)
        .map(|n| {
            let mut r = record(n + 1);
            let i = n as usize;
            r.tenant = tenant(["acme", "globex"][i % 2]);
            r.user = user(["alice", "bob", "carol"][i % 3]);
            r.company = ((i / 7) % 2 == 0).then(|| company("eng"));
            r.model = ModelName::parse(["gpt-4o", "claude-3"][(i / 2) % 2]).unwrap();
            r.endpoint = ((i / 5) % 2 == 0).then(|| Endpoint::parse("chat").unwrap());
            r.day_start = JAN + (i as i64 % 3) * DAY;
            r.created_at = r.day_start + 1_000_000 * i as i64;
            r.cost = Money::from_micros(1_000 + i as i64 * 7);
            if i == 13 {
                r.status = RequestStatus::Expired;
            }
            r
        })
        .collect()
}

fn matches(q: &RecordQuery, r: &UsageRecord) -> bool {
    r.day_start >= q.from_day
        && r.day_start <= q.to_day
        && q.tenant.as_ref().is_none_or(|t| *t == r.tenant)
        && q.company
            .as_ref()
            .is_none_or(|c| r.company.as_ref() == Some(c))
        && q.user.as_ref().is_none_or(|u| *u == r.user)
        && q.model.as_deref().is_none_or(|m| m == r.model.as_str())
        && q.endpoint
            .as_deref()
            .is_none_or(|e| r.endpoint.as_ref().map(|x| x.as_str()) == Some(e))
}

fn brute_slices(q: &RecordQuery, all: &[UsageRecord]) -> Vec<DaySlice> {
    let mut groups: BTreeMap<(i64, String, String, Option<String>), UsageTotals> = BTreeMap::new();
    for r in all
        .iter()
        .filter(|r| matches(q, r) && r.status != RequestStatus::Expired)
    {
        let t = groups
            .entry((
                r.day_start,
                r.tenant.as_str().to_owned(),
                r.model.as_str().to_owned(),
                r.endpoint.as_ref().map(|e| e.as_str().to_owned()),
            ))
            .or_default();
        t.add(&UsageTotals {
            requests: 1,
            input_tokens: r.tokens.input,
            cached_input_tokens: r.tokens.cached_input,
            output_tokens: r.tokens.output,
            cost: r.cost,
        });
    }
    groups
        .into_iter()
        .map(|((day, tenant, model, endpoint), totals)| DaySlice {
            day,
            tenant: Some(tenant),
            model: Some(model),
            endpoint,
            totals,
        })
        .collect()
}

pub async fn dashboard_reads_match_the_records(db: &Db) {
    let store = db.store().await;
    let all = records();
    store
        .apply(&all.iter().cloned().map(Event::Recorded).collect::<Vec<_>>())
        .await
        .unwrap();
    let queries = [
        RecordQuery {
            from_day: JAN,
            to_day: JAN + 2 * DAY,
            ..Default::default()
        },
        RecordQuery {
            from_day: JAN + DAY,
            to_day: JAN + 2 * DAY,
            tenant: Some(tenant("acme")),
            ..Default::default()
        },
        RecordQuery {
            from_day: JAN,
            to_day: JAN + 2 * DAY,
            tenant: Some(tenant("globex")),
            user: Some(user("bob")),
            ..Default::default()
        },
        RecordQuery {
            from_day: JAN,
            to_day: JAN + DAY,
            tenant: Some(tenant("acme")),
            company: Some(company("eng")),
            model: Some("claude-3".into()),
            ..Default::default()
        },
        RecordQuery {
            from_day: JAN,
            to_day: JAN + 2 * DAY,
            endpoint: Some("chat".into()),
            model: Some("gpt-4o".into()),
            ..Default::default()
        },
    ];
    for q in &queries {
        // Newest first, every match, paged without overlap.
        let mut want: Vec<&UsageRecord> = all.iter().filter(|r| matches(q, r)).collect();
        want.sort_by_key(|r| std::cmp::Reverse((r.created_at, r.id)));
        assert!(!want.is_empty(), "{q:?} matches nothing");
        let mut got = Vec::new();
        let mut offset = 0;
        loop {
            let page = store.usage_records(q, 4, offset).await.unwrap();
            assert!(page.len() <= 4);
            if page.is_empty() {
                break;
            }
            offset += page.len();
            got.extend(page);
        }
        let got_ids: Vec<_> = got.iter().map(|r| r.id).collect();
        let want_ids: Vec<_> = want.iter().map(|r| r.id).collect();
        assert_eq!(got_ids, want_ids, "{q:?}");
        assert_eq!(got[0], *want[0]);
        assert_eq!(
            store.usage_slices(q).await.unwrap(),
            brute_slices(q, &all),
            "{q:?}"
        );
    }

    // The rollups' day rows: per tenant and model, per tenant and endpoint, a user's models.
    let q = &queries[0];
    let model_rows = store
        .rollup_slices(&SliceDim::Model, JAN, JAN + 2 * DAY, None)
        .await
        .unwrap();
    let mut want: BTreeMap<(i64, String, String), UsageTotals> = BTreeMap::new();
    for s in brute_slices(q, &all) {
        want.entry((s.day, s.tenant.unwrap(), s.model.unwrap()))
            .or_default()
            .add(&s.totals);
    }
    let got: BTreeMap<(i64, String, String), UsageTotals> = model_rows
        .into_iter()
        .map(|s| {
            assert_eq!(s.endpoint, None);
            ((s.day, s.tenant.unwrap(), s.model.unwrap()), s.totals)
        })
        .collect();
    assert_eq!(got, want);
    let endpoint_rows = store
        .rollup_slices(&SliceDim::Endpoint, JAN, JAN, Some(&tenant("acme")))
        .await
        .unwrap();
    let mut want: BTreeMap<(i64, Option<String>), UsageTotals> = BTreeMap::new();
    let acme_day = RecordQuery {
        from_day: JAN,
        to_day: JAN,
        tenant: Some(tenant("acme")),
        ..Default::default()
    };
    for s in brute_slices(&acme_day, &all) {
        want.entry((s.day, s.endpoint)).or_default().add(&s.totals);
    }
    let got: BTreeMap<(i64, Option<String>), UsageTotals> = endpoint_rows
        .into_iter()
        .map(|s| ((s.day, s.endpoint), s.totals))
        .collect();
    assert_eq!(got, want);
    assert!(
        want.keys().any(|(_, e)| e.is_none()),
        "no record without an endpoint"
    );
    let user_rows = store
        .rollup_slices(
            &SliceDim::UserModel(user("bob")),
            JAN,
            JAN + 2 * DAY,
            Some(&tenant("globex")),
        )
        .await
        .unwrap();
    let mut want: BTreeMap<(i64, String), UsageTotals> = BTreeMap::new();
    for s in brute_slices(&queries[2], &all) {
        want.entry((s.day, s.model.unwrap()))
            .or_default()
            .add(&s.totals);
    }
    let got: BTreeMap<(i64, String), UsageTotals> = user_rows
        .into_iter()
        .map(|s| ((s.day, s.model.unwrap()), s.totals))
        .collect();
    assert_eq!(got, want);
}

pub async fn audit_log_and_acknowledgements_round_trip(db: &Db) {
    let store = db.store().await;
    assert!(store.audit_log(10, 0).await.unwrap().is_empty());
    let entry = |n: i64| AuditEntry {
        id: 0,
        at: JAN + n,
        actor: "admin sg_1234".into(),
        action: "budget.set".into(),
        target: format!("tenant acme {n}"),
        before: (n > 1).then(|| r#"{"daily_usd":null}"#.to_owned()),
        after: Some(format!(r#"{{"daily_usd":{n}}}"#)),
    };
    let mut ids = Vec::new();
    for n in 1..=5 {
        ids.push(store.insert_audit(&entry(n)).await.unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let page = store.audit_log(3, 0).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(),
        ["tenant acme 5", "tenant acme 4", "tenant acme 3"]
    );
    assert_eq!(
        page[0],
        AuditEntry {
            id: ids[4],
            ..entry(5)
        }
    );
    let rest = store.audit_log(3, 3).await.unwrap();
    assert_eq!(rest.len(), 2);
    assert_eq!(rest[1].before, None);

    let inserted = store
        .insert_alerts(
            &[NewAlert {
                scope: ScopeKey::Tenant(tenant("acme")),
                window: Window::Day,
                window_start: JAN,
                threshold_percent: 80,
                kind: AlertKind::Threshold,
                amount: Money::from_micros(8),
                limit: Money::from_micros(10),
                created_at: JAN + 5,
            }],
            &[],
        )
        .await
        .unwrap();
    let id = inserted[0].id;
    assert!(store.alert_acks(&[id]).await.unwrap().is_empty());
    assert!(
        store
            .acknowledge_alert(id, "admin a", JAN + 7)
            .await
            .unwrap()
    );
    // The first acknowledgement stays.
    assert!(
        store
            .acknowledge_alert(id, "admin b", JAN + 9)
            .await
            .unwrap()
    );
    assert!(
        !store
            .acknowledge_alert(id + 1000, "admin a", JAN)
            .await
            .unwrap()
    );
    let acks = store.alert_acks(&[id, id + 1000]).await.unwrap();
    assert_eq!(acks.len(), 1);
    assert_eq!(
        (acks[0].alert_id, acks[0].at, acks[0].actor.as_str()),
        (id, JAN + 7, "admin a")
    );
}
