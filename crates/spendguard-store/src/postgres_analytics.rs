//! Analytics reads, alerts and webhook deliveries on postgres.
//!
//! Reports are summed by the database (in `numeric`, saturated to `bigint`). Alerts are
//! inserted with `ON CONFLICT DO NOTHING` on their unique key: of concurrent inserts of the
//! same alert, from any number of connections or instances, exactly one inserts it (the
//! others wait for its transaction, then find the row).

use std::time::SystemTime;

use futures_util::StreamExt;
use spendguard_core::{Micros, TenantId, UserId};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::common::{
    AlertCols, DeliveryCols, Groups, ReportPlan, alert_order, scope_columns, scope_kind_from_str,
    sort_models, sql_limit, usage_totals,
};
use crate::postgres::{Db, PostgresStore, from_time, get, read_snapshot, time, to_time};
use crate::postgres_copy::{CopyReader, int8, text};
use crate::{
    AlertQuery, AlertRecord, Delivery, DeliveryOutcome, ModelUsage, NewAlert, Report, ReportQuery,
    StoreError,
};

/// The sums of a group of `usage_rollups` rows, saturated like the rows.
const SUMS: &str = "LEAST(sum(requests), 9223372036854775807)::int8, \
    LEAST(sum(input_tokens), 9223372036854775807)::int8, \
    LEAST(sum(cached_input_tokens), 9223372036854775807)::int8, \
    LEAST(sum(output_tokens), 9223372036854775807)::int8, \
    GREATEST(LEAST(sum(cost_micros), 9223372036854775807), -9223372036854775808)::int8";

/// The SQL of a report from `usage_rollups` (groupings by model or endpoint): `(0, '',
/// key)` of each group, then its sums.
fn usage_report_sql(of_tenant: bool) -> String {
    let tenant = if of_tenant { " AND tenant_id = $4" } else { "" };
    format!(
        "SELECT 0::int8, ''::text, key, {SUMS} FROM usage_rollups \
         WHERE dim = $1 AND day_start >= $2 AND day_start <= $3{tenant} GROUP BY key"
    )
}

/// One tenant's (`$5`) `rollups` rows of the scope kinds `$4` (an array) in one window
/// (`$1`) with starts from `$2` to `$3`: one range of the primary key, read once per range
/// of a report's plan (every tenant's rows: [`rollup_rows_copy`]). The rows are summed in
/// Rust, as on SQLite: summing 100,000s of rows into 10,000 groups in the server sorted
/// them on disk with the default `work_mem`, and one statement over all the ranges (a join
/// with their array) was planned as a scan of the whole table.
const TENANT_ROLLUP_ROWS: &str = "SELECT scope_kind, window_start, tenant_id, scope_id, \
    requests, input_tokens, cached_input_tokens, output_tokens, spent_micros FROM rollups \
    WHERE \"window\" = $1 AND window_start >= $2 AND window_start <= $3 \
    AND scope_kind = ANY($4::text[]) AND tenant_id = $5";

/// Every tenant's `rollups` rows of the scope kinds `kinds` in one window with starts from
/// `first` to `last` (one range of `rollups_window`), as a binary `COPY … TO STDOUT`, which
/// takes no parameters: the window and the kinds are the store's own names, the bounds
/// integers.
fn rollup_rows_copy(window: &str, first: Micros, last: Micros, kinds: &[&str]) -> String {
    let kinds = kinds
        .iter()
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "COPY (SELECT scope_kind, window_start, tenant_id, scope_id, requests, input_tokens, \
         cached_input_tokens, output_tokens, spent_micros FROM rollups \
         WHERE \"window\" = '{window}' AND window_start >= {first} AND window_start <= {last} \
         AND scope_kind IN ({kinds})) TO STDOUT (FORMAT binary)"
    )
}

const USER_DAY: &str = "SELECT model, requests, input_tokens, cached_input_tokens, \
    output_tokens, cost_micros FROM usage_rollups \
    WHERE dim = 'user_model' AND day_start = $1 AND tenant_id = $2 AND key = $3";

/// The columns of an alert read by [`alert_row`], from `alerts` as `a`.
const ALERT_COLUMNS: &str = "a.id, a.scope_kind, a.tenant_id, a.scope_id, a.\"window\", \
    a.window_start, a.threshold_percent::int8, a.kind, a.created_at, a.amount_micros, \
    a.limit_micros";

const INSERT_ALERT: &str = "INSERT INTO alerts (scope_kind, tenant_id, scope_id, \"window\", \
    window_start, threshold_percent, kind, created_at, amount_micros, limit_micros) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING RETURNING id";

const INSERT_DELIVERIES: &str = "INSERT INTO webhook_deliveries (alert_id, url, state, \
    attempts, next_attempt_at) SELECT $1, u, 'pending', 0, $3 FROM UNNEST($2::text[]) AS u \
    ON CONFLICT (alert_id, url) DO NOTHING";

/// Reads the alert columns starting at `base`.
fn alert_row(row: &Row, base: usize) -> Result<AlertRecord, StoreError> {
    AlertCols {
        id: get(row, base)?,
        scope_kind: get(row, base + 1)?,
        tenant: get(row, base + 2)?,
        scope_id: get(row, base + 3)?,
        window: get(row, base + 4)?,
        window_start: get(row, base + 5)?,
        threshold_percent: get(row, base + 6)?,
        kind: get(row, base + 7)?,
        created_at: time(row, base + 8)?,
        amount_micros: get(row, base + 9)?,
        limit_micros: get(row, base + 10)?,
    }
    .decode()
}

fn opt_time(row: &Row, idx: usize) -> Result<Option<Micros>, StoreError> {
    Ok(get::<Option<SystemTime>>(row, idx)?.map(from_time))
}

/// The delivery columns, then the alert's.
fn delivery_sql(filter: &str) -> String {
    format!(
        "SELECT d.id, d.url, d.state, d.attempts::int8, d.next_attempt_at, d.delivered_at, \
         d.last_error, {ALERT_COLUMNS} FROM webhook_deliveries d \
         JOIN alerts a ON a.id = d.alert_id {filter}"
    )
}

fn delivery_row(row: &Row) -> Result<Delivery, StoreError> {
    DeliveryCols {
        id: get(row, 0)?,
        url: get(row, 1)?,
        state: get(row, 2)?,
        attempts: get(row, 3)?,
        next_attempt_at: opt_time(row, 4)?,
        delivered_at: opt_time(row, 5)?,
        last_error: get(row, 6)?,
    }
    .decode(alert_row(row, 7)?)
}

impl PostgresStore {
    pub async fn report(&self, query: &ReportQuery) -> Result<Report, StoreError> {
        let plan = ReportPlan::new(query)?;
        self.catch_up_for_report().await?;
        let client = self.client().await?;
        let tenant = query.tenant.as_ref().map(|t| t.as_str());
        let mut groups = Groups::new(query.group_by);
        match plan {
            ReportPlan::Usage(dim) => {
                let stmt = client
                    .prepare_cached(&usage_report_sql(tenant.is_some()))
                    .await
                    .db()?;
                let dim = dim.as_str();
                let mut params: Vec<&(dyn ToSql + Sync)> =
                    vec![&dim, &query.from_day, &query.to_day];
                if let Some(tenant) = &tenant {
                    params.push(tenant);
                }
                for row in &client.query(&stmt, &params).await.db()? {
                    let totals = usage_totals(
                        get(row, 3)?,
                        get(row, 4)?,
                        get(row, 5)?,
                        get(row, 6)?,
                        get(row, 7)?,
                    )?;
                    groups.add(get(row, 0)?, get(row, 1)?, get(row, 2)?, &totals);
                }
            }
            ReportPlan::Rollups { kinds, ranges } => {
                // One read-only repeatable-read transaction: every range from one snapshot.
                let mut client = client;
                let tx = read_snapshot(&mut client).await?;
                // Each range planned for its bounds: a generic plan cannot tell a few days
                // of rows (an index range) from most of the table (a scan).
                tx.batch_execute("SET LOCAL plan_cache_mode = force_custom_plan")
                    .await
                    .db()?;
                let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                if let Some(tenant) = &tenant {
                    // One tenant's rows (a few thousand at most), through the primary key.
                    let stmt = tx.prepare_cached(TENANT_ROLLUP_ROWS).await.db()?;
                    for (window, first, last) in &ranges {
                        let window = window.as_str();
                        let params: [&(dyn ToSql + Sync); 5] =
                            [&window, first, last, &kinds, tenant];
                        for row in &tx.query(&stmt, &params).await.db()? {
                            let totals = usage_totals(
                                get(row, 4)?,
                                get(row, 5)?,
                                get(row, 6)?,
                                get(row, 7)?,
                                get(row, 8)?,
                            )?;
                            groups.add_scope(
                                scope_kind_from_str(get(row, 0)?)?,
                                get(row, 1)?,
                                get(row, 2)?,
                                get(row, 3)?,
                                &totals,
                            );
                        }
                    }
                } else {
                    // Every tenant's rows: 100,000s of them (10,000 users times the days
                    // and weeks of the range), read through binary COPY and summed as they
                    // arrive, without a `Row` built and kept for each.
                    for (window, first, last) in &ranges {
                        let sql = rollup_rows_copy(window.as_str(), *first, *last, &kinds);
                        let mut reader = CopyReader::<9>::new();
                        let mut chunks = std::pin::pin!(tx.copy_out(&sql).await.db()?);
                        while let Some(chunk) = chunks.next().await {
                            reader.feed(&chunk.db()?, |f| {
                                let totals = usage_totals(
                                    int8(f[4], "requests")?,
                                    int8(f[5], "input_tokens")?,
                                    int8(f[6], "cached_input_tokens")?,
                                    int8(f[7], "output_tokens")?,
                                    int8(f[8], "spent_micros")?,
                                )?;
                                groups.add_scope(
                                    scope_kind_from_str(text(f[0], "scope_kind")?)?,
                                    int8(f[1], "window_start")?,
                                    text(f[2], "tenant_id")?,
                                    text(f[3], "scope_id")?,
                                    &totals,
                                );
                                Ok(())
                            })?;
                        }
                        reader.finish()?;
                    }
                }
                tx.commit().await.db()?;
            }
        }
        Ok(groups.finish(query.limit))
    }

    pub async fn user_day(
        &self,
        tenant: &TenantId,
        user: &UserId,
        day_start: Micros,
    ) -> Result<Vec<ModelUsage>, StoreError> {
        self.catch_up_for_report().await?;
        let client = self.client().await?;
        let stmt = client.prepare_cached(USER_DAY).await.db()?;
        let rows = client
            .query(&stmt, &[&day_start, &tenant.as_str(), &user.as_str()])
            .await
            .db()?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(ModelUsage {
                model: get(row, 0)?,
                totals: usage_totals(
                    get(row, 1)?,
                    get(row, 2)?,
                    get(row, 3)?,
                    get(row, 4)?,
                    get(row, 5)?,
                )?,
            });
        }
        sort_models(&mut out);
        Ok(out)
    }

    pub async fn insert_alerts(
        &self,
        alerts: &[NewAlert],
        webhook_urls: &[String],
    ) -> Result<Vec<AlertRecord>, StoreError> {
        if alerts.is_empty() {
            return Ok(Vec::new());
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        let insert = tx.prepare_cached(INSERT_ALERT).await.db()?;
        let deliver = tx.prepare_cached(INSERT_DELIVERIES).await.db()?;
        let mut inserted = Vec::new();
        for i in alert_order(alerts) {
            let a = &alerts[i];
            let (kind, tenant, id) = scope_columns(&a.scope);
            let threshold = i32::try_from(a.threshold_percent).map_err(|_| {
                StoreError::Invalid(format!(
                    "threshold_percent {} is out of range",
                    a.threshold_percent
                ))
            })?;
            let created_at = to_time(a.created_at)?;
            let row = tx
                .query_opt(
                    &insert,
                    &[
                        &kind,
                        &tenant,
                        &id,
                        &a.window.as_str(),
                        &a.window_start,
                        &threshold,
                        &a.kind.as_str(),
                        &created_at,
                        &a.amount.micros(),
                        &a.limit.micros(),
                    ],
                )
                .await
                .db()?;
            if let Some(row) = row {
                let new_id: i64 = get(&row, 0)?;
                if !webhook_urls.is_empty() {
                    tx.execute(&deliver, &[&new_id, &webhook_urls, &created_at])
                        .await
                        .db()?;
                }
                inserted.push((i, new_id));
            }
        }
        tx.commit().await.db()?;
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

    pub async fn would_deny_counts(
        &self,
        from_day: Micros,
        to_day: Micros,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        // What reports read is projected from the journal first.
        self.catch_up_for_report().await?;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT reason, count(*) FROM would_deny \
                 WHERE day_start >= $1 AND day_start <= $2 \
                 AND ($3::text IS NULL OR tenant_id = $3) GROUP BY reason ORDER BY reason",
            )
            .await
            .db()?;
        let tenant = tenant.map(|t| t.as_str());
        let rows = client
            .query(&stmt, &[&from_day, &to_day, &tenant])
            .await
            .db()?;
        rows.iter()
            .map(|row| {
                let reason: String = row.try_get(0).db()?;
                let n: i64 = row.try_get(1).db()?;
                Ok((reason, u64::try_from(n).unwrap_or(0)))
            })
            .collect()
    }

    pub async fn alerts(&self, query: &AlertQuery) -> Result<Vec<AlertRecord>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {ALERT_COLUMNS} FROM alerts a \
                 WHERE ($1::text IS NULL OR (a.tenant_id = $1 AND a.scope_kind <> 'global')) \
                 AND ($2::int8 IS NULL OR (a.\"window\" = 'day' AND a.window_start >= $2) \
                      OR (a.\"window\" = 'month' AND a.window_start >= $3::int8)) \
                 ORDER BY a.created_at DESC, a.id DESC LIMIT $4"
            ))
            .await
            .db()?;
        let tenant = query.tenant.as_ref().map(|t| t.as_str());
        let day = query.current.map(|c| c.0);
        let month = query.current.map(|c| c.1);
        let limit = sql_limit(query.limit);
        let rows = client
            .query(&stmt, &[&tenant, &day, &month, &limit])
            .await
            .db()?;
        rows.iter().map(|row| alert_row(row, 0)).collect()
    }

    pub async fn due_deliveries(
        &self,
        now: Micros,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&delivery_sql(
                "WHERE d.state = 'pending' AND d.next_attempt_at <= $1 \
                 ORDER BY d.next_attempt_at, d.id LIMIT $2",
            ))
            .await
            .db()?;
        let rows = client
            .query(&stmt, &[&to_time(now)?, &sql_limit(Some(limit))])
            .await
            .db()?;
        rows.iter().map(delivery_row).collect()
    }

    /// Cluster mode: takes up to `limit` due deliveries for this instance alone. Each is
    /// moved to `now + lease_us` in the same statement (rows another instance is claiming
    /// are skipped), so no two instances send the same one; one not finished within the
    /// lease (its instance died) is due again then.
    pub async fn claim_due_deliveries(
        &self,
        now: Micros,
        limit: usize,
        lease_us: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "WITH due AS (SELECT id FROM webhook_deliveries \
                 WHERE state = 'pending' AND next_attempt_at <= $1 \
                 ORDER BY next_attempt_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 UPDATE webhook_deliveries AS d SET next_attempt_at = $3 FROM due \
                 WHERE d.id = due.id RETURNING d.id",
            )
            .await
            .db()?;
        let until = to_time(now.saturating_add(lease_us))?;
        let ids: Vec<i64> = client
            .query(&stmt, &[&to_time(now)?, &sql_limit(Some(limit)), &until])
            .await
            .db()?
            .iter()
            .map(|r| get(r, 0))
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let stmt = client
            .prepare_cached(&delivery_sql("WHERE d.id = ANY($1) ORDER BY d.id"))
            .await
            .db()?;
        let rows = client.query(&stmt, &[&ids]).await.db()?;
        rows.iter().map(delivery_row).collect()
    }

    pub async fn finish_delivery(
        &self,
        id: i64,
        outcome: &DeliveryOutcome,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let n = match outcome {
            DeliveryOutcome::Delivered { at } => {
                let stmt = client
                    .prepare_cached(
                        "UPDATE webhook_deliveries SET attempts = attempts + 1, \
                         state = 'delivered', delivered_at = $2, next_attempt_at = NULL \
                         WHERE id = $1",
                    )
                    .await
                    .db()?;
                client.execute(&stmt, &[&id, &to_time(*at)?]).await
            }
            DeliveryOutcome::Retry {
                next_attempt_at,
                error,
            } => {
                let stmt = client
                    .prepare_cached(
                        "UPDATE webhook_deliveries SET attempts = attempts + 1, \
                         state = 'pending', next_attempt_at = $2, last_error = $3 WHERE id = $1",
                    )
                    .await
                    .db()?;
                client
                    .execute(&stmt, &[&id, &to_time(*next_attempt_at)?, error])
                    .await
            }
            DeliveryOutcome::Failed { error } => {
                let stmt = client
                    .prepare_cached(
                        "UPDATE webhook_deliveries SET attempts = attempts + 1, \
                         state = 'failed', next_attempt_at = NULL, last_error = $2 WHERE id = $1",
                    )
                    .await
                    .db()?;
                client.execute(&stmt, &[&id, error]).await
            }
        }
        .db()?;
        if n == 0 {
            return Err(StoreError::Invalid(format!("no webhook delivery {id}")));
        }
        Ok(())
    }

    pub async fn deliveries(&self) -> Result<Vec<Delivery>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(&delivery_sql("ORDER BY d.id"), &[])
            .await
            .db()?;
        rows.iter().map(delivery_row).collect()
    }
}
