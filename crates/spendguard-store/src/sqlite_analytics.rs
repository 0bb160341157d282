//! Analytics reads, alerts and webhook deliveries on sqlite.
//!
//! Reads run on the store's query-only connection; alerts and delivery outcomes are written
//! by the writer connection, each call in one transaction.

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use spendguard_core::{Micros, ScopeKind, TenantId, UserId};

use crate::common::{
    AlertCols, DeliveryCols, Groups, ReportPlan, alert_order, scope_columns, sort_models,
    sql_limit, usage_totals,
};
use crate::sqlite::{Db, SqliteStore, int, opt_text, text};
use crate::{
    AlertQuery, AlertRecord, Delivery, DeliveryOutcome, ModelUsage, NewAlert, Report, ReportQuery,
    StoreError,
};

/// The `rollups` rows of one scope kind in one window with starts in a range: a range of
/// the primary key, read in order (migration 6). The sums are added up in Rust, saturating
/// (SQLite's `sum` fails on overflow).
const ROLLUP_ROWS: &str = "SELECT window_start, tenant_id, scope_id, spent_micros, requests, \
    input_tokens, cached_input_tokens, output_tokens FROM rollups \
    WHERE scope_kind = ?1 AND \"window\" = ?2 AND window_start >= ?3 AND window_start <= ?4";

/// [`ROLLUP_ROWS`] of one tenant, through `rollups_tenant`: a seek there and a lookup in the
/// primary key per row (about 1.5 µs a row), for a tenant with few rows in the range.
const ROLLUP_ROWS_OF_TENANT: &str = "SELECT window_start, tenant_id, scope_id, spent_micros, \
    requests, input_tokens, cached_input_tokens, output_tokens FROM rollups \
    INDEXED BY rollups_tenant \
    WHERE scope_kind = ?1 AND \"window\" = ?2 AND window_start >= ?3 \
    AND window_start <= ?4 AND tenant_id = ?5";

/// [`ROLLUP_ROWS`] of one tenant by reading every tenant's rows of the range in key order
/// (about 0.05 µs a row) and keeping the tenant's (the unary `+` keeps SQLite off the
/// index): for a tenant with many rows in the range.
const ROLLUP_RANGE_OF_TENANT: &str = "SELECT window_start, tenant_id, scope_id, spent_micros, \
    requests, input_tokens, cached_input_tokens, output_tokens FROM rollups \
    WHERE scope_kind = ?1 AND \"window\" = ?2 AND window_start >= ?3 \
    AND window_start <= ?4 AND +tenant_id = ?5";

/// How many of the tenant's rows the range holds, counted in `rollups_tenant` alone (no
/// lookups) and only up to [`FEW_TENANT_ROWS`] + 1.
const TENANT_ROWS_UP_TO: &str = "SELECT count(*) FROM (SELECT 1 FROM rollups \
    INDEXED BY rollups_tenant \
    WHERE scope_kind = ?1 AND \"window\" = ?2 AND window_start >= ?3 \
    AND window_start <= ?4 AND tenant_id = ?5 LIMIT 10001)";

/// Up to this many rows, a tenant's rows are read through `rollups_tenant` (at most about
/// 15 ms of lookups); more are read as a range of the key, which costs what the same report
/// over every tenant costs.
const FEW_TENANT_ROWS: i64 = 10_000;

/// The tenant's own rows (whose `scope_id` is the tenant id): one a window.
const TENANT_ROLLUP_ROWS: &str = "SELECT window_start, tenant_id, scope_id, spent_micros, \
    requests, input_tokens, cached_input_tokens, output_tokens FROM rollups \
    INDEXED BY rollups_tenant \
    WHERE scope_kind = ?1 AND \"window\" = ?2 AND window_start >= ?3 AND window_start <= ?4 \
    AND tenant_id = ?5 AND scope_id = ?5";

/// The `usage_rollups` rows of one dimension in a range of days, summed in Rust like
/// [`ROLLUP_ROWS`].
const REPORT_ROWS: &str = "SELECT day_start, tenant_id, key, requests, input_tokens, \
    cached_input_tokens, output_tokens, cost_micros FROM usage_rollups \
    WHERE dim = ?1 AND day_start >= ?2 AND day_start <= ?3";

const REPORT_ROWS_OF_TENANT: &str = "SELECT day_start, tenant_id, key, requests, input_tokens, \
    cached_input_tokens, output_tokens, cost_micros FROM usage_rollups \
    WHERE dim = ?1 AND day_start >= ?2 AND day_start <= ?3 AND tenant_id = ?4";

const USER_DAY: &str = "SELECT model, requests, input_tokens, cached_input_tokens, \
    output_tokens, cost_micros FROM usage_rollups \
    WHERE dim = 'user_model' AND day_start = ?1 AND tenant_id = ?2 AND key = ?3";

/// The columns of an alert read by [`alert_row`], from `alerts` as `a`.
const ALERT_COLUMNS: &str = "a.id, a.scope_kind, a.tenant_id, a.scope_id, a.\"window\", \
    a.window_start, a.threshold_percent, a.kind, a.created_at, a.amount_micros, a.limit_micros";

const INSERT_ALERT: &str = "INSERT INTO alerts (scope_kind, tenant_id, scope_id, \"window\", \
    window_start, threshold_percent, kind, created_at, amount_micros, limit_micros) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT DO NOTHING RETURNING id";

const INSERT_DELIVERY: &str = "INSERT INTO webhook_deliveries (alert_id, url, state, attempts, \
    next_attempt_at) VALUES (?1, ?2, 'pending', 0, ?3) ON CONFLICT (alert_id, url) DO NOTHING";

/// Reads the alert columns starting at `base`.
fn alert_row(row: &Row<'_>, base: usize) -> Result<AlertRecord, StoreError> {
    AlertCols {
        id: int(row, base)?,
        scope_kind: text(row, base + 1)?,
        tenant: text(row, base + 2)?,
        scope_id: text(row, base + 3)?,
        window: text(row, base + 4)?,
        window_start: int(row, base + 5)?,
        threshold_percent: int(row, base + 6)?,
        kind: text(row, base + 7)?,
        created_at: int(row, base + 8)?,
        amount_micros: int(row, base + 9)?,
        limit_micros: int(row, base + 10)?,
    }
    .decode()
}

/// The delivery columns, then the alert's.
fn delivery_sql(filter: &str) -> String {
    format!(
        "SELECT d.id, d.url, d.state, d.attempts, d.next_attempt_at, d.delivered_at, \
         d.last_error, {ALERT_COLUMNS} FROM webhook_deliveries d \
         JOIN alerts a ON a.id = d.alert_id {filter}"
    )
}

fn delivery_row(row: &Row<'_>) -> Result<Delivery, StoreError> {
    DeliveryCols {
        id: int(row, 0)?,
        url: text(row, 1)?,
        state: text(row, 2)?,
        attempts: int(row, 3)?,
        next_attempt_at: row.get::<_, Option<i64>>(4).db()?,
        delivered_at: row.get::<_, Option<i64>>(5).db()?,
        last_error: opt_text(row, 6)?,
    }
    .decode(alert_row(row, 7)?)
}

fn deliveries_blocking(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Delivery>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).db()?;
    let mut rows = stmt.query(params).db()?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().db()? {
        out.push(delivery_row(row)?);
    }
    Ok(out)
}

fn insert_alerts_blocking(
    conn: &mut Connection,
    alerts: &[NewAlert],
    urls: &[String],
) -> Result<Vec<AlertRecord>, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .db()?;
    let mut inserted = Vec::new();
    {
        let mut insert = tx.prepare_cached(INSERT_ALERT).db()?;
        let mut deliver = tx.prepare_cached(INSERT_DELIVERY).db()?;
        for i in alert_order(alerts) {
            let a = &alerts[i];
            let (kind, tenant, id) = scope_columns(&a.scope);
            let new_id: Option<i64> = insert
                .query_row(
                    params![
                        kind,
                        tenant,
                        id,
                        a.window.as_str(),
                        a.window_start,
                        i64::from(a.threshold_percent),
                        a.kind.as_str(),
                        a.created_at,
                        a.amount.micros(),
                        a.limit.micros(),
                    ],
                    |r| r.get(0),
                )
                .optional()
                .db()?;
            if let Some(new_id) = new_id {
                for url in urls {
                    deliver.execute(params![new_id, url, a.created_at]).db()?;
                }
                inserted.push((i, new_id));
            }
        }
    }
    tx.commit().db()?;
    // In the order given.
    inserted.sort_unstable();
    Ok(inserted
        .into_iter()
        .map(|(i, id)| AlertRecord {
            id,
            alert: alerts[i].clone(),
        })
        .collect())
}

impl SqliteStore {
    pub async fn report(&self, query: &ReportQuery) -> Result<Report, StoreError> {
        self.report_cancellable(query, Default::default()).await
    }

    /// A report; stops at the next row once `cancel` is set.
    pub async fn report_cancellable(
        &self,
        query: &ReportQuery,
        cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Report, StoreError> {
        let plan = ReportPlan::new(query)?;
        self.catch_up_for_report().await?;
        let query = query.clone();
        let cancelled = move || {
            if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                Err(StoreError::Unavailable("the report was cancelled".into()))
            } else {
                Ok(())
            }
        };
        self.with_reader(move |conn| {
            cancelled()?;
            // One read transaction: a consistent snapshot across the statements.
            let tx = conn.transaction().db()?;
            let mut groups = Groups::new(query.group_by);
            let tenant = query.tenant.as_ref().map(|t| t.as_str());
            match &plan {
                ReportPlan::Usage(dim) => {
                    let sql = match tenant {
                        Some(_) => REPORT_ROWS_OF_TENANT,
                        None => REPORT_ROWS,
                    };
                    let mut stmt = tx.prepare_cached(sql).db()?;
                    let mut rows = match tenant {
                        Some(t) => {
                            stmt.query(params![dim.as_str(), query.from_day, query.to_day, t])
                        }
                        None => stmt.query(params![dim.as_str(), query.from_day, query.to_day]),
                    }
                    .db()?;
                    while let Some(row) = rows.next().db()? {
                        cancelled()?;
                        let totals = usage_totals(
                            int(row, 3)?,
                            int(row, 4)?,
                            int(row, 5)?,
                            int(row, 6)?,
                            int(row, 7)?,
                        )?;
                        groups.add(int(row, 0)?, text(row, 1)?, text(row, 2)?, &totals);
                    }
                }
                ReportPlan::Rollups { kinds, ranges } => {
                    for &kind in kinds {
                        for &(window, first, last) in ranges {
                            let (kind_str, window) = (kind.as_str(), window.as_str());
                            let sql = match tenant {
                                Some(_) if kind == ScopeKind::Tenant => TENANT_ROLLUP_ROWS,
                                Some(t) => {
                                    let few: i64 = tx
                                        .prepare_cached(TENANT_ROWS_UP_TO)
                                        .db()?
                                        .query_row(params![kind_str, window, first, last, t], |r| {
                                            r.get(0)
                                        })
                                        .db()?;
                                    if few <= FEW_TENANT_ROWS {
                                        ROLLUP_ROWS_OF_TENANT
                                    } else {
                                        ROLLUP_RANGE_OF_TENANT
                                    }
                                }
                                None => ROLLUP_ROWS,
                            };
                            let mut stmt = tx.prepare_cached(sql).db()?;
                            let mut rows = match tenant {
                                Some(t) => stmt.query(params![kind_str, window, first, last, t]),
                                None => stmt.query(params![kind_str, window, first, last]),
                            }
                            .db()?;
                            while let Some(row) = rows.next().db()? {
                                cancelled()?;
                                let totals = usage_totals(
                                    int(row, 4)?,
                                    int(row, 5)?,
                                    int(row, 6)?,
                                    int(row, 7)?,
                                    int(row, 3)?,
                                )?;
                                groups.add_scope(
                                    kind,
                                    int(row, 0)?,
                                    text(row, 1)?,
                                    text(row, 2)?,
                                    &totals,
                                );
                            }
                        }
                    }
                }
            }
            tx.commit().db()?;
            Ok(groups.finish(query.limit))
        })
        .await
    }

    pub async fn user_day(
        &self,
        tenant: &TenantId,
        user: &UserId,
        day_start: Micros,
    ) -> Result<Vec<ModelUsage>, StoreError> {
        let (tenant, user) = (tenant.clone(), user.clone());
        self.catch_up_for_report().await?;
        self.with_reader(move |conn| {
            let mut stmt = conn.prepare_cached(USER_DAY).db()?;
            let mut rows = stmt
                .query(params![day_start, tenant.as_str(), user.as_str()])
                .db()?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().db()? {
                out.push(ModelUsage {
                    model: text(row, 0)?.to_owned(),
                    totals: usage_totals(
                        int(row, 1)?,
                        int(row, 2)?,
                        int(row, 3)?,
                        int(row, 4)?,
                        int(row, 5)?,
                    )?,
                });
            }
            sort_models(&mut out);
            Ok(out)
        })
        .await
    }

    pub async fn insert_alerts(
        &self,
        alerts: &[NewAlert],
        webhook_urls: &[String],
    ) -> Result<Vec<AlertRecord>, StoreError> {
        if alerts.is_empty() {
            return Ok(Vec::new());
        }
        let alerts = alerts.to_vec();
        let urls = webhook_urls.to_vec();
        self.with_conn(move |conn| insert_alerts_blocking(conn, &alerts, &urls))
            .await
    }

    pub async fn would_deny_counts(
        &self,
        from_day: Micros,
        to_day: Micros,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        // What reports read is projected from the journal first.
        self.catch_up_for_report().await?;
        let tenant = tenant.map(|t| t.as_str().to_owned());
        self.with_reader(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT reason, count(*) FROM would_deny \
                     WHERE day_start >= ?1 AND day_start <= ?2 \
                     AND (?3 IS NULL OR tenant_id = ?3) GROUP BY reason ORDER BY reason",
                )
                .db()?;
            let mut rows = stmt.query(params![from_day, to_day, tenant]).db()?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().db()? {
                let n: i64 = row.get(1).db()?;
                out.push((row.get(0).db()?, u64::try_from(n).unwrap_or(0)));
            }
            Ok(out)
        })
        .await
    }

    pub async fn alerts(&self, query: &AlertQuery) -> Result<Vec<AlertRecord>, StoreError> {
        let query = query.clone();
        self.with_reader(move |conn| {
            let sql = format!(
                "SELECT {ALERT_COLUMNS} FROM alerts a \
                 WHERE (?1 IS NULL OR (a.tenant_id = ?1 AND a.scope_kind <> 'global')) \
                 AND (?2 IS NULL OR (a.\"window\" = 'day' AND a.window_start >= ?2) \
                      OR (a.\"window\" = 'month' AND a.window_start >= ?3)) \
                 ORDER BY a.created_at DESC, a.id DESC LIMIT ?4"
            );
            let mut stmt = conn.prepare_cached(&sql).db()?;
            let mut rows = stmt
                .query(params![
                    query.tenant.as_ref().map(|t| t.as_str()),
                    query.current.map(|c| c.0),
                    query.current.map(|c| c.1),
                    sql_limit(query.limit),
                ])
                .db()?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().db()? {
                out.push(alert_row(row, 0)?);
            }
            Ok(out)
        })
        .await
    }

    pub async fn due_deliveries(
        &self,
        now: Micros,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.with_reader(move |conn| {
            let sql = delivery_sql(
                "WHERE d.state = 'pending' AND d.next_attempt_at <= ?1 \
                 ORDER BY d.next_attempt_at, d.id LIMIT ?2",
            );
            deliveries_blocking(conn, &sql, params![now, sql_limit(Some(limit))])
        })
        .await
    }

    pub async fn finish_delivery(
        &self,
        id: i64,
        outcome: &DeliveryOutcome,
    ) -> Result<(), StoreError> {
        let outcome = outcome.clone();
        self.with_conn(move |conn| {
            let n = match &outcome {
                DeliveryOutcome::Delivered { at } => conn
                    .prepare_cached(
                        "UPDATE webhook_deliveries SET attempts = attempts + 1, \
                         state = 'delivered', delivered_at = ?2, next_attempt_at = NULL \
                         WHERE id = ?1",
                    )
                    .db()?
                    .execute(params![id, at]),
                DeliveryOutcome::Retry {
                    next_attempt_at,
                    error,
                } => conn
                    .prepare_cached(
                        "UPDATE webhook_deliveries SET attempts = attempts + 1, \
                         state = 'pending', next_attempt_at = ?2, last_error = ?3 WHERE id = ?1",
                    )
                    .db()?
                    .execute(params![id, next_attempt_at, error]),
                DeliveryOutcome::Failed { error } => conn
                    .prepare_cached(
                        "UPDATE webhook_deliveries SET attempts = attempts + 1, \
                         state = 'failed', next_attempt_at = NULL, last_error = ?2 WHERE id = ?1",
                    )
                    .db()?
                    .execute(params![id, error]),
            }
            .db()?;
            if n == 0 {
                return Err(StoreError::Invalid(format!("no webhook delivery {id}")));
            }
            Ok(())
        })
        .await
    }

    pub async fn deliveries(&self) -> Result<Vec<Delivery>, StoreError> {
        self.with_reader(|conn| deliveries_blocking(conn, &delivery_sql("ORDER BY d.id"), []))
            .await
    }
}
