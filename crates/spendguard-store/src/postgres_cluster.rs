//! Cluster mode on PostgreSQL: a batch of decisions made under row locks of the shared
//! counters (`scope_counters`, migration 13), and the registry of instances.
//!
//! One transaction per batch, in this order, so that two batches never wait for each
//! other in a cycle:
//! 1. the idempotency keys of the batch's keyed requests: transaction advisory locks, in
//!    the order of their hashes, then the newest reservation of each key;
//! 2. the reservations the batch settles: `FOR UPDATE`, in id order;
//! 3. the counter rows of every scope the batch touches: created if missing, then
//!    `FOR UPDATE`, in key order;
//! 4. the caller decides (the ledger, on the values just locked), synchronously;
//! 5. the changed counter rows are written back and the batch's events applied to the
//!    tables (usage records, reservations, rollups, overrides) as a projection applies
//!    them; then the transaction commits, and only then is any caller answered.

use std::collections::HashMap;

use spendguard_core::{
    Event, Held, IdempotencyKey, Micros, Money, ScopeCounters, ScopeKey, Snapshot, TenantId,
    UsageRecord, WindowCounters, late_usage_id, scope_keys,
};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::common::{corrupt, scope_columns, scope_from_columns};
use crate::error::StoreError;
use crate::postgres::{
    Db, PostgresStore, RESERVATION_COLUMNS, USAGE_COLUMNS, apply_events, from_time, get,
    overrides_into, read_snapshot, reservation_row, usage_row,
};
use crate::{ReservationState, StoredReservation};

/// What a batch locks before it decides.
#[derive(Clone, Debug, Default)]
pub struct ClusterNeeds {
    /// Every scope the batch's requests count in.
    pub scopes: Vec<ScopeKey>,
    /// The reservations it settles.
    pub reservations: Vec<Uuid>,
    /// The idempotency keys of its keyed reservations.
    pub keys: Vec<(TenantId, IdempotencyKey)>,
    /// The deciding instance, when it decides busy scopes through its allowances.
    pub instance: Option<Uuid>,
}

/// What decides a batch, called by [`PostgresStore::cluster_decide`] under the batch's
/// locks, synchronously.
pub trait ClusterDecider {
    /// Whether `scope` is decided through the instance's allowance rather than on its row.
    fn through_allowance(&self, scope: &ScopeKey) -> bool;
    /// Given the instance's allowances of the batch's scopes (locked), the scopes whose
    /// rows to lock as well, to move capacity from them.
    fn top_ups(&mut self, allowances: &[(ScopeKey, Held)]) -> Vec<ScopeKey>;
    /// Decides on what was read under the locks; returns what to write.
    fn decide(&mut self, view: ClusterView) -> ClusterWrite;
}

/// What the database holds for a batch, read under its locks.
#[derive(Debug, Default)]
pub struct ClusterView {
    /// The counters of every scope asked for that is decided on its row (zero for a new
    /// scope).
    pub counters: Vec<(ScopeKey, ScopeCounters)>,
    /// The instance's allowances of the scopes decided through one (empty when new).
    pub allowances: Vec<(ScopeKey, Held)>,
    /// The rows of the scopes [`ClusterDecider::top_ups`] named.
    pub rows: Vec<(ScopeKey, Held)>,
    /// The other instances' allowances of those scopes (read after locking the rows).
    pub others: Vec<(ScopeKey, Held)>,
    /// The reservations asked for that exist, with the record that settled them.
    pub reservations: HashMap<Uuid, StoredReservation>,
    /// The record of a commit that arrived after its reservation expired, by reservation.
    pub late: HashMap<Uuid, UsageRecord>,
    /// The newest reservation made with each key asked for.
    pub by_key: HashMap<(TenantId, IdempotencyKey), StoredReservation>,
    /// The direct usage record made with each key asked for.
    pub usage_by_key: HashMap<(TenantId, IdempotencyKey), UsageRecord>,
}

/// What a batch writes: the counters it changed and its events.
#[derive(Debug, Default)]
pub struct ClusterWrite {
    pub counters: Vec<(ScopeKey, ScopeCounters)>,
    /// The allowances and the rows of the view, as they are now.
    pub allowances: Vec<(ScopeKey, Held)>,
    pub rows: Vec<(ScopeKey, Held)>,
    pub events: Vec<Event>,
}

/// A dashboard session kept in the database (cluster mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DashboardSession {
    /// SHA-256 of the cookie's value.
    pub token_hash: [u8; 32],
    /// SHA-256 of the key it signed in with.
    pub key_hash: [u8; 32],
    /// The key's name in the audit log.
    pub prefix: String,
    pub csrf: String,
}

/// One instance of the cluster, as the registry holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterInstance {
    pub id: Uuid,
    pub name: String,
    pub address: String,
    pub version: String,
    pub started_at: Micros,
    pub heartbeat_at: Micros,
    /// Set when it stopped cleanly.
    pub stopped_at: Option<Micros>,
}

const LOCK_KEYS: &str = "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT \
    hashtextextended(u.t || ' ' || u.k, 7) AS h FROM UNNEST($1::text[], $2::text[]) AS u (t, k)) \
    AS s ORDER BY h";

const COUNTER_COLUMNS: &str = "c.scope_kind, c.tenant_id, c.scope_id, \
    day_start, day_spent_micros, day_reserved_micros, day_requests, day_requests_reserved, \
    day_tokens, day_tokens_reserved, month_start, month_spent_micros, month_reserved_micros, \
    month_requests, month_requests_reserved, month_tokens, month_tokens_reserved, in_flight, tat";

const GRANTED_COLUMNS: &str = "c.day_granted_micros, c.month_granted_micros";

const CREATE_ALLOWANCES: &str = "INSERT INTO cluster_allowances (instance_id, scope_kind, \
    tenant_id, scope_id) SELECT $4::uuid, * FROM UNNEST($1::text[], $2::text[], $3::text[]) \
    AS u (k, t, i) ORDER BY 1, 2, 3 ON CONFLICT DO NOTHING";

const CREATE_COUNTERS: &str = "INSERT INTO scope_counters (scope_kind, tenant_id, scope_id) \
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u (k, t, i) ORDER BY 1, 2, 3 \
    ON CONFLICT DO NOTHING";

const WRITE_COUNTERS: &str = "UPDATE scope_counters AS c SET day_start = u.ds, \
    day_spent_micros = u.dsp, day_reserved_micros = u.dr, day_requests = u.dq, \
    day_requests_reserved = u.dqr, day_tokens = u.dt, day_tokens_reserved = u.dtr, \
    month_start = u.ms, month_spent_micros = u.msp, month_reserved_micros = u.mr, \
    month_requests = u.mq, month_requests_reserved = u.mqr, month_tokens = u.mt, \
    month_tokens_reserved = u.mtr, in_flight = u.f, tat = u.tat \
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[], \
    $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], \
    $14::int8[], $15::int8[], $16::int8[], $17::int8[], $18::int8[], $19::int8[], \
    $20::int8[], $21::int8[]) \
    AS u (k, t, i, ds, dsp, dr, dq, dqr, dt, dtr, ms, msp, mr, mq, mqr, mt, mtr, f, tat, gd, gm) \
    WHERE (c.scope_kind, c.tenant_id, c.scope_id) = (u.k, u.t, u.i)";

/// The key columns of `scopes`, as three arrays for `UNNEST`.
fn scope_arrays<'a>(
    scopes: impl IntoIterator<Item = &'a ScopeKey>,
) -> (Vec<&'static str>, Vec<&'a str>, Vec<&'a str>) {
    let (mut kinds, mut tenants, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for s in scopes {
        let (k, t, i) = scope_columns(s);
        kinds.push(k);
        tenants.push(t);
        ids.push(i);
    }
    (kinds, tenants, ids)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A count as stored. Counts are kept as two's complement: an allowance may count below
/// zero (it settled a reservation another instance admitted), and so may a row until every
/// allowance of it is folded; their sums are exact.
fn count(v: i64) -> u64 {
    v as u64
}

/// A count to store ([`count`] reads it back).
fn column(v: u64) -> i64 {
    v as i64
}

fn window_of(row: &Row, at: usize) -> Result<WindowCounters, StoreError> {
    Ok(WindowCounters {
        start: get(row, at)?,
        spent: Money::from_micros(get(row, at + 1)?),
        reserved: Money::from_micros(get(row, at + 2)?),
        requests: count(get(row, at + 3)?),
        requests_reserved: count(get(row, at + 4)?),
        tokens: count(get(row, at + 5)?),
        tokens_reserved: count(get(row, at + 6)?),
    })
}

fn counters_row(row: &Row) -> Result<(ScopeKey, ScopeCounters), StoreError> {
    let key = scope_from_columns(get(row, 0)?, get(row, 1)?, get(row, 2)?)?;
    let in_flight: i64 = get(row, 17)?;
    Ok((
        key,
        ScopeCounters {
            day: window_of(row, 3)?,
            month: window_of(row, 10)?,
            in_flight: in_flight as u32,
            tat: get(row, 18)?,
        },
    ))
}

/// A row or an allowance: [`COUNTER_COLUMNS`], then [`GRANTED_COLUMNS`].
fn held_row(row: &Row) -> Result<(ScopeKey, Held), StoreError> {
    let (key, counters) = counters_row(row)?;
    Ok((
        key,
        Held {
            counters,
            granted: [
                Money::from_micros(get(row, 19)?),
                Money::from_micros(get(row, 20)?),
            ],
        },
    ))
}

fn stored_row(row: &Row) -> Result<(StoredReservation, Option<Uuid>), StoreError> {
    let reservation = reservation_row(row)?;
    let state: &str = get(row, 16)?;
    let state = ReservationState::parse(state)
        .ok_or_else(|| corrupt(format!("unknown reservation state `{state}`")))?;
    let usage_id: Option<Uuid> = get(row, 17)?;
    Ok((
        StoredReservation {
            reservation,
            state,
            usage: None,
        },
        usage_id,
    ))
}

impl PostgresStore {
    /// Decides one batch in one transaction: locks what `needs` names, hands what it
    /// read to `decide`, writes what `decide` returns, and commits. Returns the events
    /// `decide` made (none if it did not run) and whether they were committed: on an
    /// error nothing was written, and the caller takes back what it did in memory.
    pub async fn cluster_decide(
        &self,
        needs: &ClusterNeeds,
        decide: &mut impl ClusterDecider,
    ) -> (Vec<Event>, Result<(), StoreError>) {
        let mut events = Vec::new();
        let done = self.decide_in_tx(needs, decide, &mut events).await;
        (events, done)
    }

    async fn decide_in_tx(
        &self,
        needs: &ClusterNeeds,
        decider: &mut impl ClusterDecider,
        events: &mut Vec<Event>,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        // Every statement of a batch reads or writes rows by key, a few of them: an index
        // lookup per key is always the right plan. Without this, the plans cached for
        // these statements follow the tables' statistics, and on tables that were small
        // when last analyzed (a fresh cluster, minutes before autovacuum's first analyze)
        // they are hash joins over sequential scans of `scope_counters` and `reservations`,
        // which grow with every request.
        tx.batch_execute(
            "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; \
             SET LOCAL enable_mergejoin = off",
        )
        .await
        .db()?;
        let mut view = ClusterView::default();
        if !needs.keys.is_empty() {
            let tenants: Vec<&str> = needs.keys.iter().map(|(t, _)| t.as_str()).collect();
            let keys: Vec<&str> = needs.keys.iter().map(|(_, k)| k.as_str()).collect();
            let stmt = tx.prepare_cached(LOCK_KEYS).await.db()?;
            tx.execute(&stmt, &[&tenants, &keys]).await.db()?;
            let sql = format!(
                "SELECT DISTINCT ON (tenant_id, idempotency_key) {RESERVATION_COLUMNS}, state, \
                 usage_id FROM reservations JOIN UNNEST($1::text[], $2::text[]) AS u (t, k) \
                 ON tenant_id = u.t AND idempotency_key = u.k \
                 ORDER BY tenant_id, idempotency_key, created_at DESC"
            );
            let stmt = tx.prepare_cached(&sql).await.db()?;
            for row in tx.query(&stmt, &[&tenants, &keys]).await.db()? {
                let (stored, _) = stored_row(&row)?;
                let r = &stored.reservation;
                let key = r
                    .idempotency_key
                    .clone()
                    .ok_or_else(|| corrupt("a keyed reservation without its key"))?;
                view.by_key.insert((r.subject.tenant.clone(), key), stored);
            }
            let sql = format!(
                "SELECT {USAGE_COLUMNS} FROM ai_usage JOIN UNNEST($1::text[], $2::text[]) \
                 AS u (t, k) ON tenant_id = u.t AND idempotency_key = u.k \
                 WHERE reservation_id IS NULL"
            );
            let stmt = tx.prepare_cached(&sql).await.db()?;
            for row in tx.query(&stmt, &[&tenants, &keys]).await.db()? {
                let u = usage_row(&row)?;
                if let Some(k) = u.idempotency_key.clone() {
                    view.usage_by_key.insert((u.tenant.clone(), k), u);
                }
            }
        }
        if !needs.reservations.is_empty() {
            let mut ids = needs.reservations.clone();
            ids.sort_unstable();
            ids.dedup();
            let sql = format!(
                "SELECT {RESERVATION_COLUMNS}, state, usage_id FROM UNNEST($1::uuid[]) \
                 WITH ORDINALITY AS u (uid, n) JOIN reservations ON id = u.uid \
                 ORDER BY u.n FOR UPDATE OF reservations"
            );
            let stmt = tx.prepare_cached(&sql).await.db()?;
            let mut usage_ids = Vec::new();
            for row in tx.query(&stmt, &[&ids]).await.db()? {
                let (stored, usage_id) = stored_row(&row)?;
                let id = stored.reservation.id;
                usage_ids.extend(usage_id);
                if stored.state == ReservationState::Expired {
                    usage_ids.push(late_usage_id(&id));
                }
                view.reservations.insert(id, stored);
            }
            if !usage_ids.is_empty() {
                let sql = format!("SELECT {USAGE_COLUMNS} FROM ai_usage WHERE id = ANY($1)");
                let stmt = tx.prepare_cached(&sql).await.db()?;
                for row in tx.query(&stmt, &[&usage_ids]).await.db()? {
                    let u = usage_row(&row)?;
                    let Some(rid) = u.reservation_id else {
                        continue;
                    };
                    if u.id == late_usage_id(&rid) {
                        view.late.insert(rid, u);
                    } else if let Some(s) = view.reservations.get_mut(&rid) {
                        s.usage = Some(u);
                    }
                }
            }
        }
        // The scopes of the reservations settled count too (their subjects never change).
        let mut scopes = needs.scopes.clone();
        for s in view.reservations.values() {
            scopes.extend(scope_keys(&s.reservation.subject));
        }
        scopes.sort_unstable();
        scopes.dedup();
        // Busy scopes through this instance's allowances (its own rows, which no other
        // batch waits for); the others on their rows.
        let mut hot = Vec::new();
        if let Some(me) = needs.instance {
            let (h, direct): (Vec<ScopeKey>, Vec<ScopeKey>) = scopes
                .into_iter()
                .partition(|k| decider.through_allowance(k));
            scopes = direct;
            if !h.is_empty() {
                let (kinds, tenants, ids) = scope_arrays(&h);
                let known = {
                    let k = lock(&self.known_allowances);
                    h.iter().all(|s| k.contains(s))
                };
                if !known {
                    let stmt = tx.prepare_cached(CREATE_ALLOWANCES).await.db()?;
                    tx.execute(&stmt, &[&kinds, &tenants, &ids, &me])
                        .await
                        .db()?;
                }
                let sql = format!(
                    "SELECT {COUNTER_COLUMNS}, {GRANTED_COLUMNS} FROM cluster_allowances AS c \
                     JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS u (k, t, i) \
                     ON (c.scope_kind, c.tenant_id, c.scope_id) = (u.k, u.t, u.i) \
                     WHERE c.instance_id = $4 ORDER BY 1, 2, 3 FOR UPDATE OF c"
                );
                let stmt = tx.prepare_cached(&sql).await.db()?;
                for row in tx.query(&stmt, &[&kinds, &tenants, &ids, &me]).await.db()? {
                    view.allowances.push(held_row(&row)?);
                }
                hot = h;
            }
        }
        let mut read: HashMap<ScopeKey, ScopeCounters> = HashMap::new();
        if !scopes.is_empty() {
            let (kinds, tenants, ids) = scope_arrays(&scopes);
            let known = {
                let k = self
                    .known_counters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                scopes.iter().all(|s| k.contains(s))
            };
            if !known {
                let stmt = tx.prepare_cached(CREATE_COUNTERS).await.db()?;
                tx.execute(&stmt, &[&kinds, &tenants, &ids]).await.db()?;
            }
            let sql = format!(
                "SELECT {COUNTER_COLUMNS} FROM scope_counters AS c JOIN \
                 UNNEST($1::text[], $2::text[], $3::text[]) AS u (k, t, i) \
                 ON (c.scope_kind, c.tenant_id, c.scope_id) = (u.k, u.t, u.i) \
                 ORDER BY 1, 2, 3 FOR UPDATE OF c"
            );
            let stmt = tx.prepare_cached(&sql).await.db()?;
            for row in tx.query(&stmt, &[&kinds, &tenants, &ids]).await.db()? {
                let (key, c) = counters_row(&row)?;
                read.insert(key.clone(), c);
                view.counters.push((key, c));
            }
        }
        // Every row asked for exists (created above, or known to exist): a decision on a
        // scope without its row could not be written back.
        if read.len() != scopes.len() {
            self.known_counters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            return Err(StoreError::Unavailable(
                "scope_counters lacks rows this instance knew; the batch runs again, \
                 creating them (40001)"
                    .into(),
            ));
        }
        // Another instance took this one's allowances back (its heartbeat had lapsed)
        // since they were known to exist: run again, creating them.
        if view.allowances.len() != hot.len() {
            lock(&self.known_allowances).clear();
            return Err(StoreError::Unavailable(
                "this instance's allowance rows were taken back meanwhile; the batch runs \
                 again (40001)"
                    .into(),
            ));
        }
        // Rows of busy scopes, locked only to move capacity to this instance (last, in key
        // order: whatever else a batch locks, it locked before).
        let mut wants = decider.top_ups(&view.allowances);
        wants.sort_unstable();
        wants.dedup();
        let mut held: HashMap<ScopeKey, Held> = HashMap::new();
        if !wants.is_empty() {
            view.rows = lock_rows(&tx, &wants).await?;
            held.extend(view.rows.iter().cloned());
            if let Some(me) = needs.instance {
                view.others = others(&tx, &wants, me).await?;
            }
        }
        let mine: HashMap<ScopeKey, Held> = view.allowances.iter().cloned().collect();
        let write = decider.decide(view);
        events.extend(write.events);
        let changed: Vec<&(ScopeKey, ScopeCounters)> = write
            .counters
            .iter()
            .filter(|(k, c)| read.get(k) != Some(c))
            .collect();
        if !changed.is_empty() {
            write_counters(&tx, &changed).await?;
        }
        write_changed(&tx, "scope_counters", None, &write.rows, &held).await?;
        write_changed(
            &tx,
            "cluster_allowances",
            needs.instance,
            &write.allowances,
            &mine,
        )
        .await?;
        if !events.is_empty() {
            apply_events(&tx, events).await?;
            if events.iter().any(|e| {
                matches!(
                    e,
                    Event::BudgetSet { .. } | Event::UserSet { .. } | Event::TenantPricesSet { .. }
                )
            }) {
                tx.execute(
                    "UPDATE cluster_config SET version = version + 1 WHERE id = 1",
                    &[],
                )
                .await
                .db()?;
            }
        }
        tx.commit().await.db()?;
        self.known_counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(read.into_keys());
        lock(&self.known_allowances).extend(hot);
        Ok(())
    }

    /// Makes the counter rows hold what the tables hold, when the database was last written
    /// by a single-node instance (or never): the current day's and month's rollups, and
    /// the open reservations. Once, whichever instance starts first (the others find it
    /// done); a single-node start marks the database as its own again
    /// ([`settings::WRITER_MODE`](crate::settings::WRITER_MODE)). Returns whether it
    /// rebuilt them.
    pub async fn cluster_seed(
        &self,
        day_start: Micros,
        month_start: Micros,
    ) -> Result<bool, StoreError> {
        self.catch_up().await?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('spendguard-cluster-seed:' \
             || current_database() || '.' || coalesce(current_schema(), ''), 0))",
            &[],
        )
        .await
        .db()?;
        let mode = tx
            .query_opt(
                "SELECT value FROM settings WHERE key = $1",
                &[&crate::settings::WRITER_MODE],
            )
            .await
            .db()?;
        if let Some(row) = mode
            && get::<&str>(&row, 0)? == "cluster"
        {
            tx.commit().await.db()?;
            return Ok(false);
        }
        tx.batch_execute("DELETE FROM cluster_allowances; DELETE FROM scope_counters")
            .await
            .db()?;
        tx.execute(
            "INSERT INTO scope_counters (scope_kind, tenant_id, scope_id, day_start, \
             day_spent_micros, day_requests, day_tokens, month_start) \
             SELECT scope_kind, tenant_id, scope_id, window_start, spent_micros, requests, \
             tokens, $2 FROM rollups WHERE \"window\" = 'day' AND window_start = $1",
            &[&day_start, &month_start],
        )
        .await
        .db()?;
        tx.execute(
            "INSERT INTO scope_counters (scope_kind, tenant_id, scope_id, day_start, \
             month_start, month_spent_micros, month_requests, month_tokens) \
             SELECT scope_kind, tenant_id, scope_id, $1, window_start, spent_micros, requests, \
             tokens FROM rollups WHERE \"window\" = 'month' AND window_start = $2 \
             ON CONFLICT (scope_kind, tenant_id, scope_id) DO UPDATE SET \
             month_spent_micros = EXCLUDED.month_spent_micros, \
             month_requests = EXCLUDED.month_requests, month_tokens = EXCLUDED.month_tokens",
            &[&day_start, &month_start],
        )
        .await
        .db()?;
        // Each open reservation counts in its scopes' windows it was admitted in, when those
        // are the current ones (as restoring a single node counts it), and in flight.
        tx.execute(
            "WITH o AS (SELECT * FROM reservations WHERE state = 'open'), \
             s AS ( \
               SELECT 'global' AS k, '' AS t, 'global' AS i, estimate_micros AS e, \
                 estimated_tokens AS tk, day_start AS ds, month_start AS ms FROM o \
               UNION ALL SELECT 'tenant', tenant_id, tenant_id, estimate_micros, \
                 estimated_tokens, day_start, month_start FROM o \
               UNION ALL SELECT 'company', tenant_id, company_id, estimate_micros, \
                 estimated_tokens, day_start, month_start FROM o WHERE company_id IS NOT NULL \
               UNION ALL SELECT 'user', tenant_id, user_id, estimate_micros, \
                 estimated_tokens, day_start, month_start FROM o), \
             a AS (SELECT k, t, i, \
               coalesce(sum(e) FILTER (WHERE ds = $1), 0)::int8 AS de, \
               count(*) FILTER (WHERE ds = $1) AS dn, \
               coalesce(sum(tk) FILTER (WHERE ds = $1), 0)::int8 AS dt, \
               coalesce(sum(e) FILTER (WHERE ms = $2), 0)::int8 AS me, \
               count(*) FILTER (WHERE ms = $2) AS mn, \
               coalesce(sum(tk) FILTER (WHERE ms = $2), 0)::int8 AS mt, \
               count(*) AS n FROM s GROUP BY k, t, i) \
             INSERT INTO scope_counters (scope_kind, tenant_id, scope_id, day_start, \
               month_start, day_reserved_micros, day_requests_reserved, day_tokens_reserved, \
               month_reserved_micros, month_requests_reserved, month_tokens_reserved, in_flight) \
             SELECT k, t, i, $1, $2, de, dn, dt, me, mn, mt, n FROM a \
             ON CONFLICT (scope_kind, tenant_id, scope_id) DO UPDATE SET \
               day_reserved_micros = EXCLUDED.day_reserved_micros, \
               day_requests_reserved = EXCLUDED.day_requests_reserved, \
               day_tokens_reserved = EXCLUDED.day_tokens_reserved, \
               month_reserved_micros = EXCLUDED.month_reserved_micros, \
               month_requests_reserved = EXCLUDED.month_requests_reserved, \
               month_tokens_reserved = EXCLUDED.month_tokens_reserved, \
               in_flight = EXCLUDED.in_flight",
            &[&day_start, &month_start],
        )
        .await
        .db()?;
        tx.execute(
            "INSERT INTO settings (key, value) VALUES ($1, 'cluster') \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&crate::settings::WRITER_MODE],
        )
        .await
        .db()?;
        tx.commit().await.db()?;
        self.known_counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(true)
    }

    /// The counters of `scopes` as committed now, without locking (what a status shows).
    pub async fn cluster_counters(
        &self,
        scopes: &[ScopeKey],
    ) -> Result<Vec<(ScopeKey, ScopeCounters)>, StoreError> {
        let (kinds, tenants, ids) = scope_arrays(scopes);
        let client = self.client().await?;
        let sql = format!(
            "SELECT {COUNTER_COLUMNS} FROM cluster_scope_totals AS c JOIN \
             UNNEST($1::text[], $2::text[], $3::text[]) AS u (k, t, i) \
             ON (c.scope_kind, c.tenant_id, c.scope_id) = (u.k, u.t, u.i)"
        );
        let stmt = client.prepare_cached(&sql).await.db()?;
        client
            .query(&stmt, &[&kinds, &tenants, &ids])
            .await
            .db()?
            .iter()
            .map(counters_row)
            .collect()
    }

    /// The counters of every scope of the given kinds (`global`, `tenant`, ...) as the
    /// cluster holds them now.
    pub async fn cluster_counters_of_kinds(
        &self,
        kinds: &[&str],
    ) -> Result<Vec<(ScopeKey, ScopeCounters)>, StoreError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {COUNTER_COLUMNS} FROM cluster_scope_totals AS c \
             WHERE c.scope_kind = ANY($1)"
        );
        let stmt = client.prepare_cached(&sql).await.db()?;
        client
            .query(&stmt, &[&kinds])
            .await
            .db()?
            .iter()
            .map(counters_row)
            .collect()
    }

    /// The ids of open reservations due to expire at `now`, oldest first.
    pub async fn cluster_due(&self, now: Micros, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT id FROM reservations WHERE state = 'open' \
                 AND expires_at <= to_timestamp($1::float8 / 1000000) \
                 ORDER BY expires_at LIMIT $2",
            )
            .await
            .db()?;
        let at = now as f64;
        client
            .query(&stmt, &[&at, &limit])
            .await
            .db()?
            .iter()
            .map(|r| get(r, 0))
            .collect()
    }

    /// The admin overrides (budgets, users, tenant prices) and the configuration version
    /// they are at.
    pub async fn cluster_overrides(&self) -> Result<(i64, Snapshot), StoreError> {
        let mut client = self.client().await?;
        let tx = read_snapshot(&mut client).await?;
        let row = tx
            .query_one("SELECT version FROM cluster_config WHERE id = 1", &[])
            .await
            .db()?;
        let version: i64 = get(&row, 0)?;
        let mut snapshot = Snapshot::default();
        overrides_into(&tx, &mut snapshot).await?;
        tx.commit().await.db()?;
        Ok((version, snapshot))
    }

    /// Registers this instance (or marks it alive again after a restart with its id).
    pub async fn cluster_register(&self, me: &ClusterInstance) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO cluster_instances (id, name, address, version, started_at, \
                 heartbeat_at) VALUES ($1, $2, $3, $4, now(), now()) ON CONFLICT (id) DO UPDATE \
                 SET name = EXCLUDED.name, address = EXCLUDED.address, \
                 version = EXCLUDED.version, started_at = now(), heartbeat_at = now(), \
                 stopped_at = NULL",
                &[&me.id, &me.name, &me.address, &me.version],
            )
            .await
            .db()?;
        Ok(())
    }

    /// Beats this instance's heart; returns the configuration version and how many
    /// instances are live (a heartbeat within `lease` seconds, not stopped; this one
    /// included).
    pub async fn cluster_heartbeat(&self, id: Uuid, lease: f64) -> Result<(i64, i64), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "WITH beat AS (UPDATE cluster_instances SET heartbeat_at = now() \
                 WHERE id = $1) SELECT version, (SELECT count(*) FROM cluster_instances \
                 WHERE id <> $1 AND stopped_at IS NULL \
                 AND heartbeat_at > now() - make_interval(secs => $2)) + 1 \
                 FROM cluster_config WHERE id = 1",
            )
            .await
            .db()?;
        let row = client.query_one(&stmt, &[&id, &lease]).await.db()?;
        Ok((get(&row, 0)?, get(&row, 1)?))
    }

    /// Folds the allowances of `instance` into their rows in one transaction: `plan` gets
    /// each (scope, row, allowance), locked, and changes them ([`spendguard_core::fold`],
    /// [`spendguard_core::grant`]); with `drop`, the allowances are deleted afterwards
    /// (`plan` must have folded them). Returns how many there were.
    pub async fn cluster_fold(
        &self,
        instance: Uuid,
        drop: bool,
        plan: impl FnOnce(&mut [(ScopeKey, Held, Held)], &[(ScopeKey, Held)]),
    ) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        let sql = format!(
            "SELECT {COUNTER_COLUMNS}, {GRANTED_COLUMNS} FROM cluster_allowances AS c \
             WHERE instance_id = $1 ORDER BY 1, 2, 3 FOR UPDATE"
        );
        let stmt = tx.prepare_cached(&sql).await.db()?;
        let allowances = tx
            .query(&stmt, &[&instance])
            .await
            .db()?
            .iter()
            .map(held_row)
            .collect::<Result<Vec<_>, _>>()?;
        if allowances.is_empty() {
            tx.commit().await.db()?;
            return Ok(0);
        }
        let keys: Vec<ScopeKey> = allowances.iter().map(|(k, _)| k.clone()).collect();
        let rows: HashMap<ScopeKey, Held> = lock_rows(&tx, &keys).await?.into_iter().collect();
        let mut items = allowances
            .into_iter()
            .map(|(k, a)| {
                let row = rows
                    .get(&k)
                    .copied()
                    .ok_or_else(|| corrupt("a scope's row is missing right after its creation"))?;
                Ok((k, row, a))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let mine: HashMap<ScopeKey, Held> = items.iter().map(|(k, _, a)| (k.clone(), *a)).collect();
        let others = others(&tx, &keys, instance).await?;
        plan(&mut items, &others);
        let (new_rows, new_mine): (Vec<_>, Vec<_>) = items
            .iter()
            .map(|(k, row, a)| ((k.clone(), *row), (k.clone(), *a)))
            .unzip();
        write_changed(&tx, "scope_counters", None, &new_rows, &rows).await?;
        if drop {
            tx.execute(
                "DELETE FROM cluster_allowances WHERE instance_id = $1",
                &[&instance],
            )
            .await
            .db()?;
        } else {
            write_changed(&tx, "cluster_allowances", Some(instance), &new_mine, &mine).await?;
        }
        tx.commit().await.db()?;
        Ok(items.len())
    }

    /// Instances holding allowances whose heartbeat lapsed `lease` seconds ago, that
    /// stopped, or that are not registered.
    pub async fn cluster_lapsed(&self, lease: f64) -> Result<Vec<Uuid>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT DISTINCT a.instance_id FROM cluster_allowances a \
                 LEFT JOIN cluster_instances i ON i.id = a.instance_id \
                 WHERE i.id IS NULL OR i.stopped_at IS NOT NULL \
                 OR i.heartbeat_at < now() - make_interval(secs => $1)",
            )
            .await
            .db()?;
        client
            .query(&stmt, &[&lease])
            .await
            .db()?
            .iter()
            .map(|r| get(r, 0))
            .collect()
    }

    /// Every allowance, by instance and scope.
    pub async fn cluster_allowance_list(&self) -> Result<Vec<(Uuid, ScopeKey, Held)>, StoreError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {COUNTER_COLUMNS}, {GRANTED_COLUMNS}, c.instance_id \
             FROM cluster_allowances AS c ORDER BY c.instance_id, 1, 2, 3"
        );
        client
            .query(&sql, &[])
            .await
            .db()?
            .iter()
            .map(|r| {
                let (k, h) = held_row(r)?;
                Ok((get(r, 21)?, k, h))
            })
            .collect()
    }

    /// Marks this instance stopped (a clean shutdown).
    pub async fn cluster_stopped(&self, id: Uuid) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE cluster_instances SET stopped_at = now() WHERE id = $1",
                &[&id],
            )
            .await
            .db()?;
        Ok(())
    }

    /// Every registered instance, newest heartbeat first; and the database's clock.
    pub async fn cluster_instances(&self) -> Result<(Micros, Vec<ClusterInstance>), StoreError> {
        let client = self.client().await?;
        let now = client.query_one("SELECT now()", &[]).await.db()?;
        let rows = client
            .query(
                "SELECT id, name, address, version, started_at, heartbeat_at, stopped_at \
                 FROM cluster_instances ORDER BY heartbeat_at DESC, id",
                &[],
            )
            .await
            .db()?;
        let time = |r: &Row, i: usize| -> Result<Micros, StoreError> { Ok(from_time(get(r, i)?)) };
        let list = rows
            .iter()
            .map(|r| {
                Ok(ClusterInstance {
                    id: get(r, 0)?,
                    name: get(r, 1)?,
                    address: get(r, 2)?,
                    version: get(r, 3)?,
                    started_at: time(r, 4)?,
                    heartbeat_at: time(r, 5)?,
                    stopped_at: get::<Option<std::time::SystemTime>>(r, 6)?.map(from_time),
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok((time(&now, 0)?, list))
    }

    /// Keeps a dashboard session (cluster mode: every instance reads it); forgets expired
    /// ones, and the key's oldest beyond `per_key`.
    pub async fn put_dashboard_session(
        &self,
        session: &DashboardSession,
        ttl_seconds: i64,
        per_key: i64,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        tx.execute(
            "DELETE FROM dashboard_sessions WHERE expires_at <= now()",
            &[],
        )
        .await
        .db()?;
        tx.execute(
            "INSERT INTO dashboard_sessions (token_hash, key_hash, prefix, csrf, expires_at) \
             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5::int8::float8))",
            &[
                &session.token_hash.as_slice(),
                &session.key_hash.as_slice(),
                &session.prefix,
                &session.csrf,
                &ttl_seconds,
            ],
        )
        .await
        .db()?;
        tx.execute(
            "DELETE FROM dashboard_sessions WHERE key_hash = $1 AND token_hash NOT IN ( \
             SELECT token_hash FROM dashboard_sessions WHERE key_hash = $1 \
             ORDER BY expires_at DESC LIMIT $2)",
            &[&session.key_hash.as_slice(), &per_key],
        )
        .await
        .db()?;
        tx.commit().await.db()
    }

    /// The live dashboard session whose cookie hashes to `token_hash`.
    pub async fn dashboard_session(
        &self,
        token_hash: &[u8; 32],
    ) -> Result<Option<DashboardSession>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT key_hash, prefix, csrf FROM dashboard_sessions \
                 WHERE token_hash = $1 AND expires_at > now()",
            )
            .await
            .db()?;
        let Some(row) = client
            .query_opt(&stmt, &[&token_hash.as_slice()])
            .await
            .db()?
        else {
            return Ok(None);
        };
        let key: &[u8] = get(&row, 0)?;
        Ok(Some(DashboardSession {
            token_hash: *token_hash,
            key_hash: key
                .try_into()
                .map_err(|_| corrupt("a session's key hash is not 32 bytes"))?,
            prefix: get(&row, 1)?,
            csrf: get(&row, 2)?,
        }))
    }

    /// Ends a dashboard session everywhere.
    pub async fn delete_dashboard_session(&self, token_hash: &[u8; 32]) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM dashboard_sessions WHERE token_hash = $1",
                &[&token_hash.as_slice()],
            )
            .await
            .db()?;
        Ok(())
    }

    /// Every scope's counters as the cluster holds them: its row plus its allowances'.
    pub async fn cluster_all_counters(&self) -> Result<Vec<(ScopeKey, ScopeCounters)>, StoreError> {
        self.cluster_counters_of_kinds(&["global", "tenant", "company", "user"])
            .await
    }
}

async fn write_counters(
    tx: &deadpool_postgres::Transaction<'_>,
    rows: &[&(ScopeKey, ScopeCounters)],
) -> Result<(), StoreError> {
    let rows: Vec<(ScopeKey, Held)> = rows
        .iter()
        .map(|(k, c)| {
            (
                k.clone(),
                Held {
                    counters: *c,
                    granted: [Money::ZERO; 2],
                },
            )
        })
        .collect();
    write_rows(
        tx,
        "scope_counters",
        None,
        false,
        &rows.iter().collect::<Vec<_>>(),
    )
    .await
}

/// Writes those of `now` that differ from what was read (`before`), with their grants.
async fn write_changed(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &str,
    instance: Option<Uuid>,
    now: &[(ScopeKey, Held)],
    before: &HashMap<ScopeKey, Held>,
) -> Result<(), StoreError> {
    let changed: Vec<&(ScopeKey, Held)> = now
        .iter()
        .filter(|(k, h)| before.get(k) != Some(h))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    write_rows(tx, table, instance, true, &changed).await
}

/// Writes the counters of `rows` to `table` (`scope_counters`, or `instance`'s rows of
/// `cluster_allowances`), with what they granted when `granted`; one statement.
async fn write_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &str,
    instance: Option<Uuid>,
    granted: bool,
    rows: &[&(ScopeKey, Held)],
) -> Result<(), StoreError> {
    let mut cols: [Vec<i64>; 18] = Default::default();
    let keys: Vec<&ScopeKey> = rows.iter().map(|(k, _)| k).collect();
    let (kinds, tenants, ids) = scope_arrays(keys);
    for (_, h) in rows {
        let c = &h.counters;
        let vals = [
            c.day.start,
            c.day.spent.micros(),
            c.day.reserved.micros(),
            column(c.day.requests),
            column(c.day.requests_reserved),
            column(c.day.tokens),
            column(c.day.tokens_reserved),
            c.month.start,
            c.month.spent.micros(),
            c.month.reserved.micros(),
            column(c.month.requests),
            column(c.month.requests_reserved),
            column(c.month.tokens),
            column(c.month.tokens_reserved),
            i64::from(c.in_flight as i32),
            c.tat,
            h.granted[0].micros(),
            h.granted[1].micros(),
        ];
        for (col, v) in cols.iter_mut().zip(vals) {
            col.push(v);
        }
    }
    let mut sql = WRITE_COUNTERS.replacen("scope_counters", table, 1);
    if granted {
        sql = sql.replacen(
            "tat = u.tat ",
            "tat = u.tat, day_granted_micros = u.gd, month_granted_micros = u.gm ",
            1,
        );
    }
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&kinds, &tenants, &ids];
    for c in &cols {
        params.push(c);
    }
    if let Some(me) = &instance {
        sql.push_str(" AND c.instance_id = $22");
        params.push(me);
    }
    let stmt = tx.prepare_cached(&sql).await.db()?;
    tx.execute(&stmt, &params).await.db()?;
    Ok(())
}

/// Locks the rows of `keys` (sorted), creating the missing ones, with what they granted.
async fn lock_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    keys: &[ScopeKey],
) -> Result<Vec<(ScopeKey, Held)>, StoreError> {
    let (kinds, tenants, ids) = scope_arrays(keys);
    let stmt = tx.prepare_cached(CREATE_COUNTERS).await.db()?;
    tx.execute(&stmt, &[&kinds, &tenants, &ids]).await.db()?;
    let sql = format!(
        "SELECT {COUNTER_COLUMNS}, {GRANTED_COLUMNS} FROM scope_counters AS c JOIN \
         UNNEST($1::text[], $2::text[], $3::text[]) AS u (k, t, i) \
         ON (c.scope_kind, c.tenant_id, c.scope_id) = (u.k, u.t, u.i) \
         ORDER BY 1, 2, 3 FOR UPDATE OF c"
    );
    let stmt = tx.prepare_cached(&sql).await.db()?;
    tx.query(&stmt, &[&kinds, &tenants, &ids])
        .await
        .db()?
        .iter()
        .map(held_row)
        .collect()
}

/// The allowances of `keys` held by instances other than `me` (not locked: what they
/// counted beyond their grants is only read, see [`spendguard_core::debts`]).
async fn others(
    tx: &deadpool_postgres::Transaction<'_>,
    keys: &[ScopeKey],
    me: Uuid,
) -> Result<Vec<(ScopeKey, Held)>, StoreError> {
    let (kinds, tenants, ids) = scope_arrays(keys);
    let sql = format!(
        "SELECT {COUNTER_COLUMNS}, {GRANTED_COLUMNS} FROM cluster_allowances AS c JOIN \
         UNNEST($1::text[], $2::text[], $3::text[]) AS u (k, t, i) \
         ON (c.scope_kind, c.tenant_id, c.scope_id) = (u.k, u.t, u.i) \
         WHERE c.instance_id <> $4"
    );
    let stmt = tx.prepare_cached(&sql).await.db()?;
    tx.query(&stmt, &[&kinds, &tenants, &ids, &me])
        .await
        .db()?
        .iter()
        .map(held_row)
        .collect()
}
