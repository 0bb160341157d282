//! The dashboard's reads and writes (see `browse`) on SQLite.

use rusqlite::types::Value;
use rusqlite::{OptionalExtension, params, params_from_iter};
use spendguard_core::{Micros, TenantId, UsageRecord};

use crate::StoreError;
use crate::browse::{
    AlertAck, AuditEntry, DaySlice, RecordQuery, SliceDim, record_filters, rollup_slice,
    sort_slices,
};
use crate::common::usage_totals;
use crate::sqlite::{Db, SqliteStore, USAGE_COLUMNS, int, opt_text, text, usage_row};

/// `WHERE` and its parameters for `q`. `created_at >= from_day` holds for every record of
/// the range (a record's day starts at or before it) and lets the indexes on
/// `(tenant_id, [user_id,] created_at)` bound the scan.
fn record_where(q: &RecordQuery) -> (String, Vec<Value>) {
    let mut sql = String::from("WHERE day_start >= ?1 AND day_start <= ?2 AND created_at >= ?1");
    let mut values = vec![Value::Integer(q.from_day), Value::Integer(q.to_day)];
    for (column, value) in record_filters(q) {
        values.push(Value::Text(value));
        sql.push_str(&format!(" AND {column} = ?{}", values.len()));
    }
    (sql, values)
}

impl SqliteStore {
    pub async fn usage_records(
        &self,
        q: &RecordQuery,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let (filter, mut values) = record_where(q);
        values.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
        values.push(Value::Integer(i64::try_from(offset).unwrap_or(i64::MAX)));
        let sql = format!(
            "SELECT {USAGE_COLUMNS} FROM ai_usage {filter} \
             ORDER BY created_at DESC, id DESC LIMIT ?{} OFFSET ?{}",
            values.len() - 1,
            values.len()
        );
        self.catch_up_for_report().await?;
        self.with_reader(move |conn| {
            let mut stmt = conn.prepare_cached(&sql).db()?;
            let mut rows = stmt.query(params_from_iter(values)).db()?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().db()? {
                out.push(usage_row(row)?);
            }
            Ok(out)
        })
        .await
    }

    pub async fn usage_slices(&self, q: &RecordQuery) -> Result<Vec<DaySlice>, StoreError> {
        let (filter, values) = record_where(q);
        let sql = format!(
            "SELECT day_start, tenant_id, model, endpoint, count(*), sum(input_tokens), \
             sum(cached_input_tokens), sum(output_tokens), sum(cost_micros) FROM ai_usage \
             {filter} AND request_status <> 'expired' \
             GROUP BY day_start, tenant_id, model, endpoint"
        );
        self.catch_up_for_report().await?;
        self.with_reader(move |conn| {
            let mut stmt = conn.prepare_cached(&sql).db()?;
            let mut rows = stmt.query(params_from_iter(values)).db()?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().db()? {
                out.push(DaySlice {
                    day: int(row, 0)?,
                    tenant: Some(text(row, 1)?.to_owned()),
                    model: Some(text(row, 2)?.to_owned()),
                    endpoint: opt_text(row, 3)?.map(str::to_owned),
                    totals: usage_totals(
                        int(row, 4)?,
                        int(row, 5)?,
                        int(row, 6)?,
                        int(row, 7)?,
                        int(row, 8)?,
                    )?,
                });
            }
            sort_slices(&mut out);
            Ok(out)
        })
        .await
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
             WHERE dim = ?1 AND day_start >= ?2 AND day_start <= ?3",
        );
        let mut values = vec![
            Value::Text(dim.name().to_owned()),
            Value::Integer(from_day),
            Value::Integer(to_day),
        ];
        if let Some(t) = tenant {
            values.push(Value::Text(t.as_str().to_owned()));
            sql.push_str(" AND tenant_id = ?4");
        }
        if let SliceDim::UserModel(u) = dim {
            values.push(Value::Text(u.as_str().to_owned()));
            sql.push_str(&format!(" AND key = ?{}", values.len()));
        }
        let dim = dim.clone();
        self.catch_up_for_report().await?;
        self.with_reader(move |conn| {
            let mut stmt = conn.prepare_cached(&sql).db()?;
            let mut rows = stmt.query(params_from_iter(values)).db()?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().db()? {
                let totals = usage_totals(
                    int(row, 4)?,
                    int(row, 5)?,
                    int(row, 6)?,
                    int(row, 7)?,
                    int(row, 8)?,
                )?;
                out.push(rollup_slice(
                    &dim,
                    int(row, 0)?,
                    text(row, 1)?.to_owned(),
                    text(row, 2)?.to_owned(),
                    text(row, 3)?.to_owned(),
                    totals,
                ));
            }
            sort_slices(&mut out);
            Ok(out)
        })
        .await
    }

    pub async fn insert_audit(&self, e: &AuditEntry) -> Result<i64, StoreError> {
        let e = e.clone();
        self.with_conn(move |conn| {
            conn.prepare_cached(
                "INSERT INTO audit_log (at, actor, action, target, before, after) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
            )
            .db()?
            .query_row(
                params![e.at, e.actor, e.action, e.target, e.before, e.after],
                |r| r.get(0),
            )
            .db()
        })
        .await
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
        self.with_conn(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, at, actor, action, target, before, after FROM audit_log \
                     ORDER BY id DESC LIMIT ?1 OFFSET ?2",
                )
                .db()?;
            let mut rows = stmt.query(params![limit, offset]).db()?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().db()? {
                out.push(AuditEntry {
                    id: int(row, 0)?,
                    at: int(row, 1)?,
                    actor: text(row, 2)?.to_owned(),
                    action: text(row, 3)?.to_owned(),
                    target: text(row, 4)?.to_owned(),
                    before: opt_text(row, 5)?.map(str::to_owned),
                    after: opt_text(row, 6)?.map(str::to_owned),
                });
            }
            Ok(out)
        })
        .await
    }

    pub async fn acknowledge_alert(
        &self,
        alert_id: i64,
        actor: &str,
        at: Micros,
    ) -> Result<bool, StoreError> {
        let actor = actor.to_owned();
        self.with_conn(move |conn| {
            let exists: Option<i64> = conn
                .prepare_cached("SELECT id FROM alerts WHERE id = ?1")
                .db()?
                .query_row([alert_id], |r| r.get(0))
                .optional()
                .db()?;
            if exists.is_none() {
                return Ok(false);
            }
            conn.prepare_cached(
                "INSERT INTO alert_acks (alert_id, at, actor) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (alert_id) DO NOTHING",
            )
            .db()?
            .execute(params![alert_id, at, actor])
            .db()?;
            Ok(true)
        })
        .await
    }

    pub async fn alert_acks(&self, ids: &[i64]) -> Result<Vec<AlertAck>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Integers only: safe to spell out.
        let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        let sql = format!(
            "SELECT alert_id, at, actor FROM alert_acks WHERE alert_id IN ({list}) \
             ORDER BY alert_id"
        );
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare(&sql).db()?;
            let mut rows = stmt.query([]).db()?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().db()? {
                out.push(AlertAck {
                    alert_id: int(row, 0)?,
                    at: int(row, 1)?,
                    actor: text(row, 2)?.to_owned(),
                });
            }
            Ok(out)
        })
        .await
    }
}
