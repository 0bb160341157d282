//! The generated usage history of the report and dashboard benchmarks: N records over 90
//! days (January, February and 30 days of March 2024), 100 tenants, 10,000 users, about
//! 1,000 companies, 8 models and 4 endpoints, inserted by bulk SQL; and the set-based SQL
//! that fills `rollups` from them. Included by `report.rs` here and by the server's
//! `benches/dashboard.rs` (`#[path]`).

#![allow(dead_code)]

use spendguard_core::Micros;

pub const DAY: Micros = 86_400_000_000;
/// 2024-01-01T00:00:00Z: the first of the 90 days.
pub const FIRST_DAY: Micros = 1_704_067_200_000_000;
pub const DAYS: i64 = 90;
/// Records inserted per statement.
pub const CHUNK: u64 = 1_000_000;

/// The columns of every generated record, as SQL over the record number `i` (`h` is a hash
/// of it). User `u` belongs to tenant `u % 100` and to one of its 10 companies, or to none
/// (one user in 11); one record in 20 is expired.
pub const SQLITE_INSERT: &str = "INSERT INTO ai_usage (id, tenant_id, user_id, company_id, model, \
    endpoint, subscription_tier, input_tokens, cached_input_tokens, output_tokens, \
    cost_micros, request_status, created_at, reservation_id, idempotency_key, day_start, \
    month_start) \
    WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?2), \
    g AS (SELECT i, (i * 2654435761) % 4294967296 AS h, (i / 90) % 10000 AS u, i % 90 AS d \
          FROM n) \
    SELECT printf('00000000-0000-7000-8000-%012x', i), 'tenant-' || (u % 100), \
           'user-' || u || '@example.com', \
           CASE WHEN (u / 100) % 11 = 10 THEN NULL \
           ELSE 'company-' || (u % 100) || '-' || ((u / 100) % 11) END, \
           'model-' || ((h >> 8) % 8), '/v1/endpoint-' || ((h >> 12) % 4), 'pro', \
           100 + h % 4000, (h >> 4) % 100, 50 + (h >> 16) % 1000, 10 + (h >> 20) % 50000, \
           CASE WHEN h % 20 = 0 THEN 'expired' WHEN h % 20 = 1 THEN 'error' \
                ELSE 'success' END, \
           ?3 + d * ?4 + (i % 86400) * 1000000, NULL, NULL, ?3 + d * ?4, \
           ?3 + (CASE WHEN d < 31 THEN 0 WHEN d < 60 THEN 31 ELSE 60 END) * ?4 \
    FROM g";

pub const POSTGRES_INSERT: &str = "INSERT INTO ai_usage (id, tenant_id, user_id, company_id, \
    model, endpoint, subscription_tier, input_tokens, cached_input_tokens, output_tokens, \
    cost_usd, request_status, created_at, reservation_id, idempotency_key, day_start, \
    month_start) \
    SELECT ('00000000-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, \
           'tenant-' || (u % 100), 'user-' || u || '@example.com', \
           CASE WHEN (u / 100) % 11 = 10 THEN NULL \
           ELSE 'company-' || (u % 100) || '-' || ((u / 100) % 11) END, \
           'model-' || ((h >> 8) % 8), '/v1/endpoint-' || ((h >> 12) % 4), 'pro', \
           100 + h % 4000, (h >> 4) % 100, 50 + (h >> 16) % 1000, \
           (10 + (h >> 20) % 50000) * 0.000001, \
           CASE WHEN h % 20 = 0 THEN 'expired' WHEN h % 20 = 1 THEN 'error' \
                ELSE 'success' END, \
           to_timestamp(($3 + d * $4 + (i % 86400) * 1000000) / 1000000.0), NULL, NULL, \
           $3 + d * $4, \
           $3 + (CASE WHEN d < 31 THEN 0 WHEN d < 60 THEN 31 ELSE 60 END) * $4 \
    FROM (SELECT i, (i * 2654435761) % 4294967296 AS h, (i / 90) % 10000 AS u, i % 90 AS d \
          FROM generate_series($1::int8, $2::int8 - 1) AS i) AS g";

/// Fills the empty `rollups` from `ai_usage`: per scope and window, the sums of the counting
/// records (the records are summed per tenant, company, user, day and month first).
/// `cost` is the expression of a record's cost in micro-USD. The sums of the generated
/// records are far from overflowing.
pub fn fill_rollups_sql(cost: &str) -> String {
    format!(
        "WITH fine AS MATERIALIZED ( \
           SELECT tenant_id, company_id, user_id, day_start, month_start, sum({cost}) AS m, \
             count(*) AS n, sum(input_tokens) AS i, sum(cached_input_tokens) AS c, \
             sum(output_tokens) AS o \
           FROM ai_usage WHERE request_status <> 'expired' \
           GROUP BY tenant_id, company_id, user_id, day_start, month_start \
         ), s AS ( \
           SELECT 'global' AS kind, '' AS tenant, 'global' AS id, day_start, month_start, \
             m, n, i, c, o FROM fine \
           UNION ALL SELECT 'tenant', tenant_id, tenant_id, day_start, month_start, m, n, i, \
             c, o FROM fine \
           UNION ALL SELECT 'company', tenant_id, company_id, day_start, month_start, m, n, \
             i, c, o FROM fine WHERE company_id IS NOT NULL \
           UNION ALL SELECT 'user', tenant_id, user_id, day_start, month_start, m, n, i, c, \
             o FROM fine \
         ), w AS ( \
           SELECT kind, tenant, id, 'day' AS win, day_start AS start, m, n, i, c, o FROM s \
           UNION ALL SELECT kind, tenant, id, 'month', month_start, m, n, i, c, o FROM s \
         ) \
         INSERT INTO rollups (scope_kind, tenant_id, scope_id, \"window\", window_start, \
           spent_micros, requests, tokens, input_tokens, cached_input_tokens, output_tokens) \
         SELECT kind, tenant, id, win, start, sum(m), sum(n), sum(i) + sum(o), sum(i), \
           sum(c), sum(o) \
         FROM w GROUP BY kind, tenant, id, win, start"
    )
}

/// The number of generated records that count (are not expired).
pub fn counting(records: u64) -> u64 {
    (0..records)
        .filter(|i| (i * 2_654_435_761) % 4_294_967_296 % 20 != 0)
        .count() as u64
}
