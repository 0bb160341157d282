//! The dashboard's reads and writes (see `browse`) on PostgreSQL.

use spendguard_core::{Micros, TenantId, UsageRecord};
use tokio_postgres::types::ToSql;

use crate::StoreError;
use crate::browse::{
    AlertAck, AuditEntry, DaySlice, RecordQuery, SliceDim, record_filters, rollup_slice,
    sort_slices,
};
use crate::common::usage_totals;
use crate::postgres::{Db, PostgresStore, USAGE_COLUMNS, get, usage_row};

/// `WHERE` for `q`, its day range as `$1` and `$2` and the filters' values after them.
fn record_where(q: &RecordQuery) -> (String, Vec<String>) {
    let mut sql = String::from("WHERE day_start >= $1 AND day_start <= $2");
    let mut values = Vec::new();
    for (column, value) in record_filters(q) {
        values.push(value);
        sql.push_str(&format!(" AND {column} = ${}", values.len() + 2));
    }
    (sql, values)
}

fn params<'a>(from: &'a i64, to: &'a i64, values: &'a [String]) -> Vec<&'a (dyn ToSql + Sync)> {
    let mut out: Vec<&(dyn ToSql + Sync)> = vec![from, to];
    out.extend(values.iter().map(|v| v as &(dyn ToSql + Sync)));
    out
}

const SUMS: &str = "count(*)::int8, \
    LEAST(sum(input_tokens), 9223372036854775807)::int8, \
    LEAST(sum(cached_input_tokens), 9223372036854775807)::int8, \
    LEAST(sum(output_tokens), 9223372036854775807)::int8, \
    GREATEST(LEAST(sum(cost_usd) * 1000000, 9223372036854775807), -9223372036854775808)::int8";

impl PostgresStore {
    pub async fn usage_records(
        &self,
        q: &RecordQuery,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let (filter, values) = record_where(q);
        let (limit, offset) = (
            i64::try_from(limit).unwrap_or(i64::MAX),
            i64::try_from(offset).unwrap_or(i64::MAX),
        );
        let n = values.len() + 2;
        let sql = format!(
            "SELECT {USAGE_COLUMNS} FROM ai_usage {filter} \
             ORDER BY created_at DESC, id DESC LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let mut p = params(&q.from_day, &q.to_day, &values);
        p.push(&limit);
        p.push(&offset);
        self.catch_up_for_report().await?;
        let client = self.client().await?;
        let rows = client.query(&sql, &p).await.db()?;
        rows.iter().map(usage_row).collect()
    }

    pub async fn usage_slices(&self, q: &RecordQuery) -> Result<Vec<DaySlice>, StoreError> {
        let (filter, values) = record_where(q);
        let sql = format!(
            "SELECT day_start, tenant_id, model, endpoint, {SUMS} FROM ai_usage {filter} \
             AND request_status <> 'expired' GROUP BY day_start, tenant_id, model, endpoint"
        );
        let p = params(&q.from_day, &q.to_day, &values);
        self.catch_up_for_report().await?;
        let client = self.client().await?;
        let rows = client.query(&sql, &p).await.db()?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(DaySlice {
                day: get(row, 0)?,
                tenant: Some(get(row, 1)?),
                model: Some(get(row, 2)?),
                endpoint: get(row, 3)?,
                totals: usage_totals(
                    get(row, 4)?,
                    get(row, 5)?,
                    get(row, 6)?,
                    get(row, 7)?,
                    get(row, 8)?,
                )?,
            });
        }
        sort_slices(&mut out);
        Ok(out)
    }

    pub async fn rollup_slices(
        &self,
        dim: &SliceDim,
        from_day: Micros,
        to_day: Micros,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<DaySlice>, StoreError> {
        let mut sql = String::from(
            "SELECT day_start, tenant_id, key, model, requests, input_tokens, \
             cached_input_tokens, output_tokens, cost_micros FROM usage_rollups \
             WHERE dim = $1 AND day_start >= $2 AND day_start <= $3",
        );
        let name = dim.name().to_owned();
        let mut p: Vec<&(dyn ToSql + Sync)> = vec![&name, &from_day, &to_day];
        let tenant_s = tenant.map(|t| t.as_str().to_owned());
        if let Some(t) = &tenant_s {
            p.push(t);
            sql.push_str(" AND tenant_id = $4");
        }
        let user_s = match dim {
            SliceDim::UserModel(u) => Some(u.as_str().to_owned()),
            _ => None,
        };
        if let Some(u) = &user_s {
            p.push(u);
            sql.push_str(&format!(" AND key = ${}", p.len()));
        }
        self.catch_up_for_report().await?;
        let client = self.client().await?;
        let rows = client.query(&sql, &p).await.db()?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let totals = usage_totals(
                get(row, 4)?,
                get(row, 5)?,
                get(row, 6)?,
                get(row, 7)?,
                get(row, 8)?,
            )?;
            out.push(rollup_slice(
                dim,
                get(row, 0)?,
                get(row, 1)?,
                get(row, 2)?,
                get(row, 3)?,
                totals,
            ));
        }
        sort_slices(&mut out);
        Ok(out)
    }

    pub async fn insert_audit(&self, e: &AuditEntry) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "INSERT INTO audit_log (at, actor, action, target, before, after) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                &[&e.at, &e.actor, &e.action, &e.target, &e.before, &e.after],
            )
            .await
            .db()?;
        get(&row, 0)
    }

    pub async fn audit_log(
        &self,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let (limit, offset) = (
            i64::try_from(limit).unwrap_or(i64::MAX),
            i64::try_from(offset).unwrap_or(i64::MAX),
        );
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, at, actor, action, target, before, after FROM audit_log \
                 ORDER BY id DESC LIMIT $1 OFFSET $2",
                &[&limit, &offset],
            )
            .await
            .db()?;
        rows.iter()
            .map(|row| {
                Ok(AuditEntry {
                    id: get(row, 0)?,
                    at: get(row, 1)?,
                    actor: get(row, 2)?,
                    action: get(row, 3)?,
                    target: get(row, 4)?,
                    before: get(row, 5)?,
                    after: get(row, 6)?,
                })
            })
            .collect()
    }

    pub async fn acknowledge_alert(
        &self,
        alert_id: i64,
        actor: &str,
        at: Micros,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let exists = client
            .query_opt("SELECT id FROM alerts WHERE id = $1", &[&alert_id])
            .await
            .db()?;
        if exists.is_none() {
            return Ok(false);
        }
        client
            .execute(
                "INSERT INTO alert_acks (alert_id, at, actor) VALUES ($1, $2, $3) \
                 ON CONFLICT (alert_id) DO NOTHING",
                &[&alert_id, &at, &actor],
            )
            .await
            .db()?;
        Ok(true)
    }

    pub async fn alert_acks(&self, ids: &[i64]) -> Result<Vec<AlertAck>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = ids.to_vec();
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT alert_id, at, actor FROM alert_acks WHERE alert_id = ANY($1) \
                 ORDER BY alert_id",
                &[&ids],
            )
            .await
            .db()?;
        rows.iter()
            .map(|row| {
                Ok(AlertAck {
                    alert_id: get(row, 0)?,
                    at: get(row, 1)?,
                    actor: get(row, 2)?,
                })
            })
            .collect()
    }
}
