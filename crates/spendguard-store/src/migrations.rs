//! Versioned schema migrations, one numbered list per backend.
//!
//! A store records each applied version in `schema_migrations(version, applied_at)` and, when
//! opened, applies the missing ones in order, each in its own transaction. Released
//! migrations are never edited: a change is a new, higher version.

/// A numbered migration: its version and its SQL.
pub(crate) type Migration = (i64, &'static str);

/// The sum of an integer column of a group, saturating at the `i64` bounds (SQLite's `sum`
/// fails on overflow): the sums of the high and low 32 bits of the values, which cannot
/// overflow, are combined by `sqlite_combine!` over the columns `<alias>_hi` and
/// `<alias>_lo`.
macro_rules! sqlite_split_sum {
    ($column:literal, $alias:literal) => {
        concat!(
            "sum(",
            $column,
            " >> 32) AS ",
            $alias,
            "_hi, sum(",
            $column,
            " & 4294967295) AS ",
            $alias,
            "_lo"
        )
    };
}

/// Combines the split sums of `sqlite_split_sum!`, saturating.
macro_rules! sqlite_combine {
    ($alias:literal) => {
        concat!(
            "CASE WHEN ",
            $alias,
            "_hi + (",
            $alias,
            "_lo >> 32) > 2147483647 ",
            "THEN 9223372036854775807 ",
            "WHEN ",
            $alias,
            "_hi + (",
            $alias,
            "_lo >> 32) < -2147483648 ",
            "THEN -9223372036854775807 - 1 ",
            "ELSE ((",
            $alias,
            "_hi + (",
            $alias,
            "_lo >> 32)) << 32) + (",
            $alias,
            "_lo & 4294967295) END"
        )
    };
}

/// One dimension's groups of the SQLite backfill: `$key` and `$model` are the expressions
/// of those columns, `$group` the `GROUP BY` list.
macro_rules! sqlite_backfill_dim {
    ($dim:literal, $key:literal, $model:literal, $group:literal) => {
        concat!(
            "SELECT '",
            $dim,
            "' AS dim, day_start, tenant_id, ",
            $key,
            " AS key, ",
            $model,
            " AS model, count(*) AS requests, ",
            sqlite_split_sum!("input_tokens", "i"),
            ", ",
            sqlite_split_sum!("cached_input_tokens", "c"),
            ", ",
            sqlite_split_sum!("output_tokens", "o"),
            ", ",
            sqlite_split_sum!("cost_micros", "m"),
            " FROM ai_usage WHERE request_status <> 'expired' GROUP BY ",
            $group
        )
    };
}

/// Fills `usage_rollups` from `ai_usage` (which must be empty first): the sums of the
/// counting records per dimension (model, endpoint, user and model) and day.
macro_rules! sqlite_backfill {
    () => {
        concat!(
            "INSERT INTO usage_rollups (dim, day_start, tenant_id, key, model, requests, \
             input_tokens, cached_input_tokens, output_tokens, cost_micros) \
             SELECT dim, day_start, tenant_id, key, model, requests, ",
            sqlite_combine!("i"),
            ", ",
            sqlite_combine!("c"),
            ", ",
            sqlite_combine!("o"),
            ", ",
            sqlite_combine!("m"),
            " FROM (",
            sqlite_backfill_dim!("model", "model", "''", "day_start, tenant_id, model"),
            " UNION ALL ",
            sqlite_backfill_dim!(
                "endpoint",
                "coalesce(endpoint, '')",
                "''",
                "day_start, tenant_id, coalesce(endpoint, '')"
            ),
            " UNION ALL ",
            sqlite_backfill_dim!(
                "user_model",
                "user_id",
                "model",
                "day_start, tenant_id, user_id, model"
            ),
            ");\n"
        )
    };
}

/// One dimension's groups of the PostgreSQL backfill (sums in `numeric`, saturated).
macro_rules! postgres_backfill_dim {
    ($dim:literal, $key:literal, $model:literal, $group:literal) => {
        concat!(
            "SELECT '",
            $dim,
            "', day_start, tenant_id, ",
            $key,
            ", ",
            $model,
            ", count(*), \
             LEAST(sum(input_tokens), 9223372036854775807)::int8, \
             LEAST(sum(cached_input_tokens), 9223372036854775807)::int8, \
             LEAST(sum(output_tokens), 9223372036854775807)::int8, \
             GREATEST(LEAST(round(sum(cost_usd) * 1000000), 9223372036854775807), \
             -9223372036854775808)::int8 \
             FROM ai_usage WHERE request_status <> 'expired' GROUP BY ",
            $group
        )
    };
}

/// Fills `usage_rollups` from `ai_usage` (which must be empty first).
macro_rules! postgres_backfill {
    () => {
        concat!(
            "INSERT INTO usage_rollups (dim, day_start, tenant_id, key, model, requests, \
             input_tokens, cached_input_tokens, output_tokens, cost_micros) ",
            postgres_backfill_dim!("model", "model", "''", "day_start, tenant_id, model"),
            " UNION ALL ",
            postgres_backfill_dim!(
                "endpoint",
                "coalesce(endpoint, '')",
                "''",
                "day_start, tenant_id, coalesce(endpoint, '')"
            ),
            " UNION ALL ",
            postgres_backfill_dim!(
                "user_model",
                "user_id",
                "model",
                "day_start, tenant_id, user_id, model"
            ),
            ";\n"
        )
    };
}

/// One scope kind's groups, in the day and the month windows, of the backfill of the token
/// sums of `rollups`. They are summed from the CTE `fine` (the sums per tenant, company,
/// user, day and month: far fewer rows than records): `$sums` are the sums selected,
/// `$tenant` and `$id` the expressions of `tenant_id` and `scope_id`, `$filter` a `WHERE`
/// clause (or nothing), `$group` the `GROUP BY` columns before the window start.
macro_rules! split_scope {
    ($sums:literal, $kind:literal, $tenant:literal, $id:literal, $filter:literal, $group:literal) => {
        concat!(
            "SELECT '",
            $kind,
            "' AS kind, ",
            $tenant,
            " AS tenant, ",
            $id,
            " AS id, 'day' AS win, day_start AS start, ",
            $sums,
            " FROM fine",
            $filter,
            " GROUP BY ",
            $group,
            "day_start UNION ALL SELECT '",
            $kind,
            "', ",
            $tenant,
            ", ",
            $id,
            ", 'month', month_start, ",
            $sums,
            " FROM fine",
            $filter,
            " GROUP BY ",
            $group,
            "month_start"
        )
    };
}

/// The groups of every scope kind (global, tenant, company, user) and window, keyed like
/// `rollups` rows by `(kind, tenant, id, win, start)`.
macro_rules! split_scopes {
    ($sums:literal) => {
        concat!(
            split_scope!($sums, "global", "''", "'global'", "", ""),
            " UNION ALL ",
            split_scope!($sums, "tenant", "tenant_id", "tenant_id", "", "tenant_id, "),
            " UNION ALL ",
            split_scope!(
                $sums,
                "company",
                "tenant_id",
                "company_id",
                " WHERE company_id IS NOT NULL",
                "tenant_id, company_id, "
            ),
            " UNION ALL ",
            split_scope!(
                $sums,
                "user",
                "tenant_id",
                "user_id",
                "",
                "tenant_id, user_id, "
            )
        )
    };
}

/// The `WHERE` clause matching a `rollups` row to its group of `split_scopes!`.
macro_rules! split_match {
    ($rollups:literal) => {
        concat!(
            " WHERE ",
            $rollups,
            ".scope_kind = split.kind AND ",
            $rollups,
            ".tenant_id = split.tenant AND ",
            $rollups,
            ".scope_id = split.id AND ",
            $rollups,
            ".\"window\" = split.win AND ",
            $rollups,
            ".window_start = split.start;\n"
        )
    };
}

/// SQLite: sets the token sums (`input_tokens`, `cached_input_tokens`, `output_tokens`) of
/// every `rollups` row from the counting records of `ai_usage`, set-based: the records are
/// read once, summed per tenant, company, user, day and month, and those sums per scope
/// and window (split in high and low halves, as `sqlite_split_sum!`, so they saturate).
macro_rules! sqlite_backfill_split {
    () => {
        concat!(
            "WITH fine AS MATERIALIZED (SELECT tenant_id, company_id, user_id, day_start, \
             month_start, ",
            sqlite_split_sum!("input_tokens", "i"),
            ", ",
            sqlite_split_sum!("cached_input_tokens", "c"),
            ", ",
            sqlite_split_sum!("output_tokens", "o"),
            " FROM ai_usage WHERE request_status <> 'expired' \
             GROUP BY tenant_id, company_id, user_id, day_start, month_start), \
             split AS (",
            split_scopes!(
                "sum(i_hi) AS i_hi, sum(i_lo) AS i_lo, sum(c_hi) AS c_hi, sum(c_lo) AS c_lo, \
                 sum(o_hi) AS o_hi, sum(o_lo) AS o_lo"
            ),
            ") UPDATE rollups SET input_tokens = ",
            sqlite_combine!("i"),
            ", cached_input_tokens = ",
            sqlite_combine!("c"),
            ", output_tokens = ",
            sqlite_combine!("o"),
            " FROM split",
            split_match!("rollups")
        )
    };
}

/// PostgreSQL: as `sqlite_backfill_split!` (sums in `numeric`, saturated).
macro_rules! postgres_backfill_split {
    () => {
        concat!(
            "WITH fine AS MATERIALIZED (SELECT tenant_id, company_id, user_id, day_start, \
             month_start, sum(input_tokens) AS i, sum(cached_input_tokens) AS c, \
             sum(output_tokens) AS o FROM ai_usage WHERE request_status <> 'expired' \
             GROUP BY tenant_id, company_id, user_id, day_start, month_start), \
             split AS (",
            split_scopes!("sum(i) AS i, sum(c) AS c, sum(o) AS o"),
            ") UPDATE rollups AS r SET \
             input_tokens = LEAST(split.i, 9223372036854775807)::int8, \
             cached_input_tokens = LEAST(split.c, 9223372036854775807)::int8, \
             output_tokens = LEAST(split.o, 9223372036854775807)::int8 \
             FROM split",
            split_match!("r")
        )
    };
}

/// SQLite: recomputes `usage_rollups` from `ai_usage` (as migration 2 does).
pub(crate) const SQLITE_REBUILD_USAGE_ROLLUPS: &str =
    concat!("DELETE FROM usage_rollups;\n", sqlite_backfill!());

/// PostgreSQL: recomputes `usage_rollups` from `ai_usage` (as migration 2 does).
pub(crate) const POSTGRES_REBUILD_USAGE_ROLLUPS: &str =
    concat!("DELETE FROM usage_rollups;\n", postgres_backfill!());

/// SQLite: instants are integer microseconds since the Unix epoch; money is integer micros.
pub(crate) const SQLITE: &[Migration] = &[
    (
        1,
        r#"
CREATE TABLE ai_usage (
    id TEXT NOT NULL PRIMARY KEY,
    user_id TEXT NOT NULL,
    company_id TEXT,
    tenant_id TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT,
    subscription_tier TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    cost_usd REAL GENERATED ALWAYS AS (cost_micros / 1000000.0) VIRTUAL,
    request_status TEXT NOT NULL
        CHECK (request_status IN ('success', 'error', 'cancelled', 'expired')),
    created_at INTEGER NOT NULL,
    reservation_id TEXT,
    idempotency_key TEXT,
    day_start INTEGER NOT NULL,
    month_start INTEGER NOT NULL
) STRICT;
CREATE INDEX ai_usage_tenant_created ON ai_usage (tenant_id, created_at);
CREATE INDEX ai_usage_tenant_user_created ON ai_usage (tenant_id, user_id, created_at);
CREATE INDEX ai_usage_created ON ai_usage (created_at);
CREATE UNIQUE INDEX ai_usage_idempotency ON ai_usage (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND reservation_id IS NULL;

CREATE TABLE reservations (
    id TEXT NOT NULL PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    company_id TEXT,
    tier TEXT,
    admitted_tier TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT,
    estimate_micros INTEGER NOT NULL,
    estimated_tokens INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    day_start INTEGER NOT NULL,
    month_start INTEGER NOT NULL,
    idempotency_key TEXT,
    fingerprint INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'open'
        CHECK (state IN ('open', 'committed', 'released', 'expired')),
    usage_id TEXT,
    reason TEXT,
    settled_at INTEGER
) STRICT;
CREATE INDEX reservations_open ON reservations (state) WHERE state = 'open';

CREATE TABLE rollups (
    scope_kind TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    "window" TEXT NOT NULL CHECK ("window" IN ('day', 'month')),
    window_start INTEGER NOT NULL,
    spent_micros INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (scope_kind, tenant_id, scope_id, "window", window_start)
) STRICT, WITHOUT ROWID;
CREATE INDEX rollups_window ON rollups ("window", window_start);

CREATE TABLE budget_overrides (
    scope_kind TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    daily_micros INTEGER,
    monthly_micros INTEGER,
    PRIMARY KEY (scope_kind, tenant_id, scope_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE user_overrides (
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    settings TEXT NOT NULL,
    PRIMARY KEY (tenant_id, user_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE api_keys (
    id TEXT NOT NULL PRIMARY KEY,
    tenant_id TEXT,
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
) STRICT;

CREATE TABLE alerts (
    id INTEGER PRIMARY KEY,
    scope_kind TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    "window" TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    threshold_percent INTEGER NOT NULL,
    kind TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    amount_micros INTEGER NOT NULL,
    limit_micros INTEGER NOT NULL,
    UNIQUE (scope_kind, tenant_id, scope_id, "window", window_start, threshold_percent, kind)
) STRICT;

CREATE TABLE webhook_deliveries (
    id INTEGER PRIMARY KEY,
    alert_id INTEGER NOT NULL REFERENCES alerts (id),
    url TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    last_error TEXT
) STRICT;
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);
"#,
    ),
    (
        2,
        concat!(
            r#"
CREATE TABLE usage_rollups (
    dim TEXT NOT NULL,
    day_start INTEGER NOT NULL,
    tenant_id TEXT NOT NULL,
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    PRIMARY KEY (dim, day_start, tenant_id, key, model)
) STRICT, WITHOUT ROWID;

-- The token split of the counters, read by reports.
ALTER TABLE rollups ADD COLUMN input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rollups ADD COLUMN cached_input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rollups ADD COLUMN output_tokens INTEGER NOT NULL DEFAULT 0;

ALTER TABLE webhook_deliveries ADD COLUMN delivered_at INTEGER;
CREATE UNIQUE INDEX webhook_deliveries_alert_url ON webhook_deliveries (alert_id, url);
"#,
            sqlite_backfill_split!(),
            sqlite_backfill!(),
            // Reports scan one scope kind over a range of window starts.
            "CREATE INDEX rollups_kind_window ON rollups (scope_kind, \"window\", window_start);\n"
        ),
    ),
    (
        3,
        r#"
-- How each record was priced (NULL: written before this column existed).
ALTER TABLE ai_usage ADD COLUMN pricing TEXT
    CHECK (pricing IN ('catalog', 'caller', 'estimate', 'default', 'free'));
-- Keyed reservations are answered from here on retries memory no longer knows.
CREATE INDEX reservations_idempotency ON reservations (tenant_id, idempotency_key, created_at)
    WHERE idempotency_key IS NOT NULL;
-- Facts about the database itself (its time zone, its identity).
CREATE TABLE settings (
    key TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
) STRICT, WITHOUT ROWID;
"#,
    ),
    (
        4,
        r#"
-- Events the store refused for good (a value it cannot hold): kept with the error, so
-- an operator can repair and re-apply them; they never block the events after them.
CREATE TABLE dead_letters (
    id TEXT PRIMARY KEY,
    event TEXT NOT NULL,
    error TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

-- This database's identity, named in the spool's header, so a spool is never replayed into
-- another database.
INSERT INTO settings (key, value) VALUES ('database_id', lower(hex(randomblob(16))));
"#,
    ),
    (
        5,
        r#"
-- Gateway mode: a record names the upstream it was forwarded to and the provider's request
-- id, and a streamed call cut off before its usage arrived is `truncated`. SQLite cannot
-- change a CHECK constraint in place, so the table is rebuilt (one copy of every row).
CREATE TABLE ai_usage_v5 (
    id TEXT NOT NULL PRIMARY KEY,
    user_id TEXT NOT NULL,
    company_id TEXT,
    tenant_id TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT,
    subscription_tier TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    cost_usd REAL GENERATED ALWAYS AS (cost_micros / 1000000.0) VIRTUAL,
    request_status TEXT NOT NULL
        CHECK (request_status IN ('success', 'error', 'cancelled', 'expired', 'truncated')),
    created_at INTEGER NOT NULL,
    reservation_id TEXT,
    idempotency_key TEXT,
    day_start INTEGER NOT NULL,
    month_start INTEGER NOT NULL,
    pricing TEXT
        CHECK (pricing IN ('catalog', 'caller', 'estimate', 'default', 'free')),
    upstream TEXT,
    provider_request_id TEXT
) STRICT;
INSERT INTO ai_usage_v5 (id, user_id, company_id, tenant_id, model, endpoint,
    subscription_tier, input_tokens, cached_input_tokens, output_tokens, cost_micros,
    request_status, created_at, reservation_id, idempotency_key, day_start, month_start,
    pricing)
SELECT id, user_id, company_id, tenant_id, model, endpoint, subscription_tier, input_tokens,
    cached_input_tokens, output_tokens, cost_micros, request_status, created_at,
    reservation_id, idempotency_key, day_start, month_start, pricing
FROM ai_usage;
DROP TABLE ai_usage;
ALTER TABLE ai_usage_v5 RENAME TO ai_usage;
CREATE INDEX ai_usage_tenant_created ON ai_usage (tenant_id, created_at);
CREATE INDEX ai_usage_tenant_user_created ON ai_usage (tenant_id, user_id, created_at);
CREATE INDEX ai_usage_created ON ai_usage (created_at);
CREATE UNIQUE INDEX ai_usage_idempotency ON ai_usage (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND reservation_id IS NULL;
"#,
    ),
    (
        6,
        r#"
-- The counters ordered by window first: the current windows' rows (read at start-up) and a
-- report's range of days (read by reports) are each a contiguous range of the primary key,
-- read in order instead of through an index with a lookup per row; and today's counters,
-- the ones being written, sit together. The old table's two window indexes are not needed
-- any more; one tenant's rows are found through `rollups_tenant`.
CREATE TABLE rollups_v6 (
    scope_kind TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    "window" TEXT NOT NULL CHECK ("window" IN ('day', 'month')),
    window_start INTEGER NOT NULL,
    spent_micros INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope_kind, "window", window_start, tenant_id, scope_id)
) STRICT, WITHOUT ROWID;
INSERT INTO rollups_v6 (scope_kind, tenant_id, scope_id, "window", window_start,
    spent_micros, requests, tokens, input_tokens, cached_input_tokens, output_tokens)
SELECT scope_kind, tenant_id, scope_id, "window", window_start, spent_micros, requests,
    tokens, input_tokens, cached_input_tokens, output_tokens
FROM rollups;
DROP TABLE rollups;
ALTER TABLE rollups_v6 RENAME TO rollups;
CREATE INDEX rollups_tenant ON rollups (scope_kind, tenant_id, "window", window_start);
"#,
    ),
    (
        7,
        r#"
-- PostgreSQL's migration 7 adds row-level security and the seed's SQL functions for direct
-- SQL readers; SQLite has neither roles nor stored functions. Nothing changes here, so both
-- backends keep the same versions.
SELECT 1;
"#,
    ),
    (
        8,
        r#"
-- The journal (see the store's `journal` module): every acknowledged batch of events,
-- appended as one row, and the cursor of its projection into the tables. AUTOINCREMENT:
-- a sequence number is never reused, even after the projected rows are deleted.
CREATE TABLE journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at INTEGER NOT NULL,
    events BLOB NOT NULL
) STRICT;
CREATE TABLE journal_cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    projected INTEGER NOT NULL
) STRICT;
INSERT INTO journal_cursor (id, projected) VALUES (1, 0);
"#,
    ),
    (
        9,
        r#"
-- Changes made through the dashboard: who, what, the state before and after (JSON).
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    before TEXT,
    after TEXT
) STRICT;

-- Alerts an operator acknowledged on the dashboard.
CREATE TABLE alert_acks (
    alert_id INTEGER PRIMARY KEY REFERENCES alerts (id),
    at INTEGER NOT NULL,
    actor TEXT NOT NULL
) STRICT;
"#,
    ),
    (
        10,
        r#"
-- Price catalog and token kinds: a record keeps its cache writes (and their 1-hour part)
-- and reasoning tokens, the long-context tier it was priced at, and two more ways it was
-- priced (`config`, `tenant_override`). SQLite cannot change a CHECK constraint in place, so
-- the table is rebuilt (one copy of every row). Tenants' price overrides get their table.
CREATE TABLE ai_usage_v10 (
    id TEXT NOT NULL PRIMARY KEY,
    user_id TEXT NOT NULL,
    company_id TEXT,
    tenant_id TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT,
    subscription_tier TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    cost_usd REAL GENERATED ALWAYS AS (cost_micros / 1000000.0) VIRTUAL,
    request_status TEXT NOT NULL
        CHECK (request_status IN ('success', 'error', 'cancelled', 'expired', 'truncated')),
    created_at INTEGER NOT NULL,
    reservation_id TEXT,
    idempotency_key TEXT,
    day_start INTEGER NOT NULL,
    month_start INTEGER NOT NULL,
    pricing TEXT
        CHECK (pricing IN ('catalog', 'config', 'tenant_override', 'caller', 'estimate',
            'default', 'free')),
    upstream TEXT,
    provider_request_id TEXT,
    cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_creation_1h_input_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    long_context_above INTEGER
) STRICT;
INSERT INTO ai_usage_v10 (id, user_id, company_id, tenant_id, model, endpoint,
    subscription_tier, input_tokens, cached_input_tokens, output_tokens, cost_micros,
    request_status, created_at, reservation_id, idempotency_key, day_start, month_start,
    pricing, upstream, provider_request_id)
SELECT id, user_id, company_id, tenant_id, model, endpoint, subscription_tier, input_tokens,
    cached_input_tokens, output_tokens, cost_micros, request_status, created_at,
    reservation_id, idempotency_key, day_start, month_start, pricing, upstream,
    provider_request_id
FROM ai_usage;
DROP TABLE ai_usage;
ALTER TABLE ai_usage_v10 RENAME TO ai_usage;
CREATE INDEX ai_usage_tenant_created ON ai_usage (tenant_id, created_at);
CREATE INDEX ai_usage_tenant_user_created ON ai_usage (tenant_id, user_id, created_at);
CREATE INDEX ai_usage_created ON ai_usage (created_at);
CREATE UNIQUE INDEX ai_usage_idempotency ON ai_usage (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND reservation_id IS NULL;

-- A tenant's negotiated prices (JSON: a multiplier in parts per million and prices per model).
CREATE TABLE tenant_prices (
    tenant_id TEXT NOT NULL PRIMARY KEY,
    settings TEXT NOT NULL
) STRICT, WITHOUT ROWID;
"#,
    ),
    (
        11,
        r#"
-- Shadow mode: each admitted reservation that a limit in shadow would have refused, with
-- the reason it would have given, counted by reports per day and tenant. Keyed by the
-- reservation, so projecting a journal batch again counts nothing twice.
CREATE TABLE would_deny (
    reservation_id TEXT NOT NULL PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    day_start INTEGER NOT NULL,
    reason TEXT NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX would_deny_day ON would_deny (day_start, tenant_id);
"#,
    ),
    (12, SQLITE_WEEKS),
    (
        13,
        r#"
-- Cluster mode runs on PostgreSQL only (its migration 13 adds the shared counters and the
-- instances); this version keeps both backends numbered alike.
SELECT 1;
"#,
    ),
    (
        14,
        r#"
-- Cluster mode's allowances are on PostgreSQL only.
SELECT 1;
"#,
    ),
    (
        15,
        r#"
-- PostgreSQL's migration 15 makes the view of cluster totals readable by key; SQLite has
-- no cluster mode.
SELECT 1;
"#,
    ),
];

/// The users' week rows summed from their day rows (saturating like the rollups), into a
/// `rollups` without week rows: migration 12, and benchmarks that fill `rollups` in bulk.
macro_rules! sqlite_fill_weeks {
    () => {
        concat!(
            "INSERT INTO rollups (scope_kind, tenant_id, scope_id, \"window\", window_start, \
             spent_micros, requests, tokens, input_tokens, cached_input_tokens, output_tokens) \
             SELECT 'user', tenant_id, scope_id, 'week', week, ",
            sqlite_combine!("s"),
            ", ",
            sqlite_combine!("r"),
            ", ",
            sqlite_combine!("t"),
            ", ",
            sqlite_combine!("i"),
            ", ",
            sqlite_combine!("c"),
            ", ",
            sqlite_combine!("o"),
            " FROM (SELECT tenant_id, scope_id, \
             window_start - (((window_start % 604800000000) + 604800000000) % 604800000000) \
             AS week, ",
            sqlite_split_sum!("spent_micros", "s"),
            ", ",
            sqlite_split_sum!("requests", "r"),
            ", ",
            sqlite_split_sum!("tokens", "t"),
            ", ",
            sqlite_split_sum!("input_tokens", "i"),
            ", ",
            sqlite_split_sum!("cached_input_tokens", "c"),
            ", ",
            sqlite_split_sum!("output_tokens", "o"),
            " FROM rollups WHERE scope_kind = 'user' AND \"window\" = 'day' \
             GROUP BY tenant_id, scope_id, week)"
        )
    };
}

/// SQLite migration 12: week rows for users (`Window::Week`: seven days of day starts per
/// bucket aligned to the Unix epoch), which reports over all users read instead of seven
/// day rows each. SQLite cannot change a `CHECK` constraint, so `rollups` is rebuilt as in
/// migration 6; the week rows are then summed from the users' day rows.
const SQLITE_WEEKS: &str = concat!(
    r#"
CREATE TABLE rollups_v12 (
    scope_kind TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    "window" TEXT NOT NULL CHECK ("window" IN ('day', 'week', 'month')),
    window_start INTEGER NOT NULL,
    spent_micros INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope_kind, "window", window_start, tenant_id, scope_id)
) STRICT, WITHOUT ROWID;
INSERT INTO rollups_v12 (scope_kind, tenant_id, scope_id, "window", window_start,
    spent_micros, requests, tokens, input_tokens, cached_input_tokens, output_tokens)
SELECT scope_kind, tenant_id, scope_id, "window", window_start, spent_micros, requests,
    tokens, input_tokens, cached_input_tokens, output_tokens
FROM rollups;
DROP TABLE rollups;
ALTER TABLE rollups_v12 RENAME TO rollups;
CREATE INDEX rollups_tenant ON rollups (scope_kind, tenant_id, "window", window_start);
"#,
    sqlite_fill_weeks!(),
    ";\n"
);

/// SQLite: fills the users' week rows of a `rollups` that has none (see migration 12).
pub const SQLITE_FILL_WEEKS: &str = sqlite_fill_weeks!();

/// PostgreSQL: the users' week rows summed from their day rows, as `sqlite_fill_weeks!`.
macro_rules! postgres_fill_weeks {
    () => {
        "INSERT INTO rollups (scope_kind, tenant_id, scope_id, \"window\", window_start, \
         spent_micros, requests, tokens, input_tokens, cached_input_tokens, output_tokens) \
         SELECT 'user', tenant_id, scope_id, 'week', \
         window_start - mod(mod(window_start, 604800000000) + 604800000000, 604800000000) \
         AS week, \
         LEAST(sum(spent_micros), 9223372036854775807)::int8, \
         LEAST(sum(requests), 9223372036854775807)::int8, \
         LEAST(sum(tokens), 9223372036854775807)::int8, \
         LEAST(sum(input_tokens), 9223372036854775807)::int8, \
         LEAST(sum(cached_input_tokens), 9223372036854775807)::int8, \
         LEAST(sum(output_tokens), 9223372036854775807)::int8 \
         FROM rollups WHERE scope_kind = 'user' AND \"window\" = 'day' \
         GROUP BY tenant_id, scope_id, week"
    };
}

/// PostgreSQL: fills the users' week rows of a `rollups` that has none (see migration 12).
pub const POSTGRES_FILL_WEEKS: &str = postgres_fill_weeks!();

/// PostgreSQL migration 12: week rows for users, as SQLite's migration 12 (a constraint can
/// be replaced in place here).
const POSTGRES_WEEKS: &str = concat!(
    r#"
ALTER TABLE rollups DROP CONSTRAINT rollups_window_check;
ALTER TABLE rollups ADD CONSTRAINT rollups_window_check
    CHECK ("window" IN ('day', 'week', 'month'));
"#,
    postgres_fill_weeks!(),
    ";\n"
);

/// PostgreSQL migration 7: row-level security and the seed's SQL functions, for applications
/// that read spendguard's tables with SQL (as the seed's Supabase code did). See
/// `docs/postgresql.md`.
const POSTGRES_ROW_SECURITY: &str = r#"
-- Row-level security. A role that does not own these tables (an application's, Supabase's
-- `authenticated`) reads only the rows of the tenant named by the setting
-- `spendguard.tenant_id` (`SET spendguard.tenant_id = 'acme'`, or `set_config(...)` per
-- transaction); none while it is unset. The owner (the role spendguard migrates and runs
-- as) is not subject to it: it is enabled, not forced, so spendguard itself reads and writes
-- every tenant's rows; superusers and BYPASSRLS roles read everything too. spendguard checks
-- at start that its role bypasses it. The policies allow SELECT only: spendguard is the only
-- writer (an INSERT by another role is refused even where it was granted).
ALTER TABLE ai_usage ENABLE ROW LEVEL SECURITY;
CREATE POLICY spendguard_tenant_read ON ai_usage FOR SELECT
    USING (tenant_id = current_setting('spendguard.tenant_id', true));
ALTER TABLE rollups ENABLE ROW LEVEL SECURITY;
CREATE POLICY spendguard_tenant_read ON rollups FOR SELECT
    USING (tenant_id = current_setting('spendguard.tenant_id', true));
ALTER TABLE usage_rollups ENABLE ROW LEVEL SECURITY;
CREATE POLICY spendguard_tenant_read ON usage_rollups FOR SELECT
    USING (tenant_id = current_setting('spendguard.tenant_id', true));
ALTER TABLE reservations ENABLE ROW LEVEL SECURITY;
CREATE POLICY spendguard_tenant_read ON reservations FOR SELECT
    USING (tenant_id = current_setting('spendguard.tenant_id', true));
ALTER TABLE alerts ENABLE ROW LEVEL SECURITY;
CREATE POLICY spendguard_tenant_read ON alerts FOR SELECT
    USING (tenant_id = current_setting('spendguard.tenant_id', true));
ALTER TABLE budget_overrides ENABLE ROW LEVEL SECURITY;
CREATE POLICY spendguard_tenant_read ON budget_overrides FOR SELECT
    USING (tenant_id = current_setting('spendguard.tenant_id', true));
ALTER TABLE user_overrides ENABLE ROW LEVEL SECURITY;
CREATE POLICY spendguard_tenant_read ON user_overrides FOR SELECT
    USING (tenant_id = current_setting('spendguard.tenant_id', true));
-- No policy: another role sees no row of these, whatever it was granted (key hashes,
-- webhook URLs, which may hold secrets, and refused events of every tenant).
ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE webhook_deliveries ENABLE ROW LEVEL SECURITY;
ALTER TABLE dead_letters ENABLE ROW LEVEL SECURITY;

-- The seed's `get_user_daily_ai_usage(user, date)`: a user's usage on one day (a date in
-- the database's time zone, `settings.time_zone`), from `usage_rollups`. The first row is
-- the day's totals (`model` NULL, present even for a day without usage); then one row per
-- model, by cost, highest first. `p_tenant_id` NULL: every tenant the caller may read (under
-- row-level security, its own). SECURITY INVOKER: the caller's row-level security applies.
CREATE FUNCTION get_user_daily_ai_usage(p_user_id text, p_date date, p_tenant_id text DEFAULT NULL)
RETURNS TABLE (model text, requests bigint, input_tokens bigint, cached_input_tokens bigint,
    output_tokens bigint, total_tokens bigint, cost_usd numeric)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $fn$
    WITH zone AS (
        SELECT coalesce((SELECT s.value FROM settings s WHERE s.key = 'time_zone'), 'UTC') AS tz
    ), day AS (
        -- The day's first and the next day's first instant, in micro-seconds since the epoch.
        SELECT (extract(epoch FROM p_date::timestamp AT TIME ZONE zone.tz) * 1000000)::int8 AS lo,
            (extract(epoch FROM (p_date + 1)::timestamp AT TIME ZONE zone.tz) * 1000000)::int8 AS hi
        FROM zone
    ), sums AS (
        SELECT u.model AS m, GROUPING(u.model) AS total,
            coalesce(sum(u.requests), 0) AS r,
            coalesce(sum(u.input_tokens), 0) AS i,
            coalesce(sum(u.cached_input_tokens), 0) AS c,
            coalesce(sum(u.output_tokens), 0) AS o,
            coalesce(sum(u.cost_micros), 0) AS micros
        FROM usage_rollups u, day
        WHERE u.dim = 'user_model' AND u.key = p_user_id
            AND u.day_start >= day.lo AND u.day_start < day.hi
            AND (p_tenant_id IS NULL OR u.tenant_id = p_tenant_id)
        GROUP BY GROUPING SETS ((), (u.model))
    )
    SELECT sums.m,
        LEAST(sums.r, 9223372036854775807)::int8,
        LEAST(sums.i, 9223372036854775807)::int8,
        LEAST(sums.c, 9223372036854775807)::int8,
        LEAST(sums.o, 9223372036854775807)::int8,
        LEAST(sums.i + sums.o, 9223372036854775807)::int8,
        round(sums.micros / 1000000.0, 6)
    FROM sums
    ORDER BY sums.total DESC, sums.micros DESC, sums.m
$fn$;

-- The seed's `get_ai_cost_alerts()`: the cost alerts of the current day and month (in the
-- database's time zone; `p_at`: current as of another instant), newest first, as
-- `GET /v1/alerts` lists them. `tenant_id` is NULL for global alerts. SECURITY INVOKER: the
-- caller's row-level security applies (a tenant's role sees its own scopes' alerts).
CREATE FUNCTION get_ai_cost_alerts(p_at timestamptz DEFAULT now())
RETURNS TABLE (id bigint, kind text, scope text, scope_id text, tenant_id text,
    "window" text, window_start timestamptz, threshold_percent integer, amount_usd numeric,
    limit_usd numeric, created_at timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path FROM CURRENT
AS $fn$
    WITH zone AS (
        SELECT coalesce((SELECT s.value FROM settings s WHERE s.key = 'time_zone'), 'UTC') AS tz
    ), cur AS (
        SELECT (extract(epoch FROM date_trunc('day', p_at AT TIME ZONE zone.tz)
                AT TIME ZONE zone.tz) * 1000000)::int8 AS day_lo,
            (extract(epoch FROM date_trunc('month', p_at AT TIME ZONE zone.tz)
                AT TIME ZONE zone.tz) * 1000000)::int8 AS month_lo
        FROM zone
    )
    SELECT a.id, a.kind, a.scope_kind, a.scope_id, nullif(a.tenant_id, ''), a."window",
        timestamptz 'epoch' + a.window_start * interval '1 microsecond',
        a.threshold_percent, round(a.amount_micros / 1000000.0, 6),
        round(a.limit_micros / 1000000.0, 6), a.created_at
    FROM alerts a, cur
    WHERE (a."window" = 'day' AND a.window_start >= cur.day_lo)
        OR (a."window" = 'month' AND a.window_start >= cur.month_lo)
    ORDER BY a.created_at DESC, a.id DESC
$fn$;
"#;

/// PostgreSQL: instants are `timestamptz`, `ai_usage.cost_usd` is `NUMERIC(19,6)` (every
/// `i64` of micro-USD fits), other money is `bigint` micros.
pub(crate) const POSTGRES: &[Migration] = &[
    (
        1,
        r#"
CREATE TABLE ai_usage (
    id uuid PRIMARY KEY,
    user_id text NOT NULL,
    company_id text,
    tenant_id text NOT NULL,
    model text NOT NULL,
    endpoint text,
    subscription_tier text NOT NULL,
    input_tokens bigint NOT NULL,
    cached_input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cost_usd numeric(19, 6) NOT NULL,
    request_status text NOT NULL
        CHECK (request_status IN ('success', 'error', 'cancelled', 'expired')),
    created_at timestamptz NOT NULL,
    reservation_id uuid,
    idempotency_key text,
    day_start bigint NOT NULL,
    month_start bigint NOT NULL
);
CREATE INDEX ai_usage_tenant_created ON ai_usage (tenant_id, created_at);
CREATE INDEX ai_usage_tenant_user_created ON ai_usage (tenant_id, user_id, created_at);
CREATE INDEX ai_usage_created ON ai_usage (created_at);
CREATE UNIQUE INDEX ai_usage_idempotency ON ai_usage (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND reservation_id IS NULL;

CREATE TABLE reservations (
    id uuid PRIMARY KEY,
    tenant_id text NOT NULL,
    user_id text NOT NULL,
    company_id text,
    tier text,
    admitted_tier text NOT NULL,
    model text NOT NULL,
    endpoint text,
    estimate_micros bigint NOT NULL,
    estimated_tokens bigint NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    day_start bigint NOT NULL,
    month_start bigint NOT NULL,
    idempotency_key text,
    fingerprint bigint NOT NULL,
    state text NOT NULL DEFAULT 'open'
        CHECK (state IN ('open', 'committed', 'released', 'expired')),
    usage_id uuid,
    reason text,
    settled_at timestamptz
);
CREATE INDEX reservations_open ON reservations (state) WHERE state = 'open';

CREATE TABLE rollups (
    scope_kind text NOT NULL,
    tenant_id text NOT NULL,
    scope_id text NOT NULL,
    "window" text NOT NULL CHECK ("window" IN ('day', 'month')),
    window_start bigint NOT NULL,
    spent_micros bigint NOT NULL,
    requests bigint NOT NULL,
    tokens bigint NOT NULL,
    PRIMARY KEY (scope_kind, tenant_id, scope_id, "window", window_start)
)
-- Free room on each page, so that counter updates are HOT (no new index entries).
WITH (fillfactor = 70);
CREATE INDEX rollups_window ON rollups ("window", window_start);

CREATE TABLE budget_overrides (
    scope_kind text NOT NULL,
    tenant_id text NOT NULL,
    scope_id text NOT NULL,
    daily_micros bigint,
    monthly_micros bigint,
    PRIMARY KEY (scope_kind, tenant_id, scope_id)
);

CREATE TABLE user_overrides (
    tenant_id text NOT NULL,
    user_id text NOT NULL,
    settings jsonb NOT NULL,
    PRIMARY KEY (tenant_id, user_id)
);

CREATE TABLE api_keys (
    id text PRIMARY KEY,
    tenant_id text,
    hash text NOT NULL UNIQUE,
    prefix text NOT NULL,
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);

CREATE TABLE alerts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scope_kind text NOT NULL,
    tenant_id text NOT NULL,
    scope_id text NOT NULL,
    "window" text NOT NULL,
    window_start bigint NOT NULL,
    threshold_percent integer NOT NULL,
    kind text NOT NULL,
    created_at timestamptz NOT NULL,
    amount_micros bigint NOT NULL,
    limit_micros bigint NOT NULL,
    UNIQUE (scope_kind, tenant_id, scope_id, "window", window_start, threshold_percent, kind)
);

CREATE TABLE webhook_deliveries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id bigint NOT NULL REFERENCES alerts (id),
    url text NOT NULL,
    state text NOT NULL DEFAULT 'pending',
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error text
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);
"#,
    ),
    (
        2,
        concat!(
            r#"
CREATE TABLE usage_rollups (
    dim text NOT NULL,
    day_start bigint NOT NULL,
    tenant_id text NOT NULL,
    key text NOT NULL,
    model text NOT NULL,
    requests bigint NOT NULL,
    input_tokens bigint NOT NULL,
    cached_input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cost_micros bigint NOT NULL,
    PRIMARY KEY (dim, day_start, tenant_id, key, model)
)
-- Free room on each page, so that counter updates are HOT (no new index entries).
WITH (fillfactor = 70);

-- The token split of the counters, read by reports.
ALTER TABLE rollups
    ADD COLUMN input_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN cached_input_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN output_tokens bigint NOT NULL DEFAULT 0;

ALTER TABLE webhook_deliveries ADD COLUMN delivered_at timestamptz;
CREATE UNIQUE INDEX webhook_deliveries_alert_url ON webhook_deliveries (alert_id, url);
"#,
            postgres_backfill_split!(),
            postgres_backfill!(),
            // Reports scan one scope kind over a range of window starts.
            "CREATE INDEX rollups_kind_window ON rollups (scope_kind, \"window\", window_start);\n"
        ),
    ),
    (
        3,
        r#"
-- How each record was priced (NULL: written before this column existed).
ALTER TABLE ai_usage ADD COLUMN pricing text
    CHECK (pricing IN ('catalog', 'caller', 'estimate', 'default', 'free'));
-- Keyed reservations are answered from here on retries memory no longer knows.
CREATE INDEX reservations_idempotency ON reservations (tenant_id, idempotency_key, created_at)
    WHERE idempotency_key IS NOT NULL;
-- Facts about the database itself (its time zone, its identity).
CREATE TABLE settings (
    key text PRIMARY KEY,
    value text NOT NULL
);
"#,
    ),
    (
        4,
        r#"
-- Events the store refused for good (a value it cannot hold): kept with the error, so
-- an operator can repair and re-apply them; they never block the events after them.
-- `event` is JSON text, not jsonb: jsonb refuses the \u0000 escape a refused event may hold.
CREATE TABLE dead_letters (
    id text PRIMARY KEY,
    event text NOT NULL,
    error text NOT NULL,
    created_at timestamptz NOT NULL
);

-- This database's identity, named in the spool's header, so a spool is never replayed into
-- another database.
INSERT INTO settings (key, value)
VALUES ('database_id', md5(random()::text || clock_timestamp()::text));
"#,
    ),
    (
        5,
        r#"
-- Gateway mode: a record names the upstream it was forwarded to and the provider's request
-- id, and a streamed call cut off before its usage arrived is `truncated`.
ALTER TABLE ai_usage DROP CONSTRAINT ai_usage_request_status_check;
ALTER TABLE ai_usage
    ADD CONSTRAINT ai_usage_request_status_check
        CHECK (request_status IN ('success', 'error', 'cancelled', 'expired', 'truncated')),
    ADD COLUMN upstream text,
    ADD COLUMN provider_request_id text;
"#,
    ),
    (
        6,
        r#"
-- SQLite's migration 6 orders its counters by window first. A PostgreSQL table is a heap
-- whatever its primary key, and reads the current windows through `rollups_window`; nothing
-- changes here, so both backends keep the same versions.
SELECT 1;
"#,
    ),
    (7, POSTGRES_ROW_SECURITY),
    (
        8,
        r#"
-- The journal (see the store's `journal` module): every acknowledged batch of events,
-- appended as one row, and the cursor of its projection into the tables. An identity is
-- never reused, even after the projected rows are deleted.
CREATE TABLE journal (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at timestamptz NOT NULL,
    events bytea NOT NULL
);
CREATE TABLE journal_cursor (
    id integer PRIMARY KEY CHECK (id = 1),
    projected bigint NOT NULL
);
INSERT INTO journal_cursor (id, projected) VALUES (1, 0);
-- Every tenant's events are in the journal: no role other than spendguard's sees a row
-- (row-level security without a policy, as for `api_keys`; see migration 7).
ALTER TABLE journal ENABLE ROW LEVEL SECURITY;
ALTER TABLE journal_cursor ENABLE ROW LEVEL SECURITY;
"#,
    ),
    (
        9,
        r#"
-- Changes made through the dashboard: who, what, the state before and after (JSON).
-- Instants are integer microseconds here, like the window starts: the log is read in
-- id order and shown, never compared with timestamps.
CREATE TABLE audit_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at bigint NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    before text,
    after text
);

-- Alerts an operator acknowledged on the dashboard.
CREATE TABLE alert_acks (
    alert_id bigint PRIMARY KEY REFERENCES alerts (id),
    at bigint NOT NULL,
    actor text NOT NULL
);
-- Both name tenants, keys and figures: no role other than spendguard's sees a row
-- (row-level security without a policy; see migration 7).
ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE alert_acks ENABLE ROW LEVEL SECURITY;
"#,
    ),
    (
        10,
        r#"
-- Price catalog and token kinds: a record keeps its cache writes (and their 1-hour part)
-- and reasoning tokens, the long-context tier it was priced at, and two more ways it was
-- priced (`config`, `tenant_override`). Tenants' price overrides get their table, readable
-- by a tenant's SQL readers like `user_overrides` (see migration 7).
ALTER TABLE ai_usage DROP CONSTRAINT ai_usage_pricing_check;
ALTER TABLE ai_usage
    ADD CONSTRAINT ai_usage_pricing_check
        CHECK (pricing IN ('catalog', 'config', 'tenant_override', 'caller', 'estimate',
            'default', 'free')),
    ADD COLUMN cache_creation_input_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_creation_1h_input_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN reasoning_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN long_context_above bigint;
CREATE TABLE tenant_prices (
    tenant_id text PRIMARY KEY,
    settings jsonb NOT NULL
);
ALTER TABLE tenant_prices ENABLE ROW LEVEL SECURITY;
CREATE POLICY spendguard_tenant_read ON tenant_prices FOR SELECT
    USING (tenant_id = current_setting('spendguard.tenant_id', true));
"#,
    ),
    (
        11,
        r#"
-- Shadow mode: each admitted reservation that a limit in shadow would have refused, with
-- the reason it would have given, counted by reports per day and tenant. Keyed by the
-- reservation, so projecting a journal batch again counts nothing twice.
CREATE TABLE would_deny (
    reservation_id uuid PRIMARY KEY,
    tenant_id text NOT NULL,
    day_start bigint NOT NULL,
    reason text NOT NULL
);
CREATE INDEX would_deny_day ON would_deny (day_start, tenant_id);
-- No role other than spendguard's sees a row (row-level security without a policy; see
-- migration 7).
ALTER TABLE would_deny ENABLE ROW LEVEL SECURITY;
"#,
    ),
    (12, POSTGRES_WEEKS),
    (
        13,
        r#"
-- Cluster mode (docs/cluster.md): the counters every instance decides on, locked row by
-- row for each batch of decisions. One row per scope holds its current day and month
-- windows (money in micro-USD), the reservations open against it and, for users, the
-- request rate's theoretical arrival time (microseconds). It keeps, per window:
-- `reserved_micros` = the estimates of its open reservations admitted in that window, and
-- `spent_micros + reserved_micros <= limit` whenever a reservation was admitted (a commit
-- above its estimate or a direct record may pass it, as on one node).
CREATE TABLE scope_counters (
    scope_kind text NOT NULL CHECK (scope_kind IN ('global', 'tenant', 'company', 'user')),
    tenant_id text NOT NULL,
    scope_id text NOT NULL,
    day_start bigint NOT NULL DEFAULT 0,
    day_spent_micros bigint NOT NULL DEFAULT 0,
    day_reserved_micros bigint NOT NULL DEFAULT 0,
    day_requests bigint NOT NULL DEFAULT 0,
    day_requests_reserved bigint NOT NULL DEFAULT 0,
    day_tokens bigint NOT NULL DEFAULT 0,
    day_tokens_reserved bigint NOT NULL DEFAULT 0,
    month_start bigint NOT NULL DEFAULT 0,
    month_spent_micros bigint NOT NULL DEFAULT 0,
    month_reserved_micros bigint NOT NULL DEFAULT 0,
    month_requests bigint NOT NULL DEFAULT 0,
    month_requests_reserved bigint NOT NULL DEFAULT 0,
    month_tokens bigint NOT NULL DEFAULT 0,
    month_tokens_reserved bigint NOT NULL DEFAULT 0,
    in_flight bigint NOT NULL DEFAULT 0,
    tat bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (scope_kind, tenant_id, scope_id)
);
-- The instances of a cluster and their heartbeats.
CREATE TABLE cluster_instances (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    address text NOT NULL,
    version text NOT NULL,
    started_at timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    stopped_at timestamptz
);
-- Bumped by every change of budgets, users or tenant prices: instances poll it and reload
-- those when it moves.
CREATE TABLE cluster_config (
    id int PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL
);
INSERT INTO cluster_config VALUES (1, 0);
-- The dashboard's sessions, so that a browser signed in through one instance is signed in
-- on all (and signed out on all): SHA-256 of the cookie, SHA-256 of the key it signed in
-- with, the key's name in the audit log, the session's CSRF token.
CREATE TABLE dashboard_sessions (
    token_hash bytea PRIMARY KEY,
    key_hash bytea NOT NULL,
    prefix text NOT NULL,
    csrf text NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX dashboard_sessions_key ON dashboard_sessions (key_hash, expires_at);
ALTER TABLE dashboard_sessions ENABLE ROW LEVEL SECURITY;
-- No role other than spendguard's sees a row (see migration 7).
ALTER TABLE scope_counters ENABLE ROW LEVEL SECURITY;
ALTER TABLE cluster_instances ENABLE ROW LEVEL SECURITY;
ALTER TABLE cluster_config ENABLE ROW LEVEL SECURITY;
"#,
    ),
    (
        14,
        r#"
-- Cluster mode's allowances (docs/cluster.md): capacity of a busy scope's row (global,
-- tenants) moved to one instance, which decides against it in memory and counts what it
-- admitted in its own row, so that batches of different instances never wait for the busy
-- row. Per window, `*_granted_micros` of a scope's row is the sum of its allowances'.
-- An allowance row counts like a scope's row (the same columns): the scope's counters are
-- its row's plus the allowances' of the same windows (`cluster_scope_totals`), and
-- `spent + reserved + granted <= limit` holds on the row whenever capacity was granted
-- or a reservation admitted on it; `spent + reserved <= granted` on an allowance whenever
-- its instance admitted against it (a commit above its estimate or a direct record may
-- pass either, as on one node).
ALTER TABLE scope_counters
    ADD COLUMN day_granted_micros bigint NOT NULL DEFAULT 0,
    ADD COLUMN month_granted_micros bigint NOT NULL DEFAULT 0;
CREATE TABLE cluster_allowances (
    instance_id uuid NOT NULL,
    LIKE scope_counters INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    PRIMARY KEY (instance_id, scope_kind, tenant_id, scope_id)
);
ALTER TABLE cluster_allowances ENABLE ROW LEVEL SECURITY;
-- Each scope's counters as the cluster holds them: its row plus what its allowances
-- counted in the same windows.
CREATE VIEW cluster_scope_totals AS
SELECT c.scope_kind, c.tenant_id, c.scope_id,
    c.day_start,
    c.day_spent_micros + coalesce(sum(a.day_spent_micros) FILTER (WHERE a.day_start = c.day_start), 0)::int8 AS day_spent_micros,
    c.day_reserved_micros + coalesce(sum(a.day_reserved_micros) FILTER (WHERE a.day_start = c.day_start), 0)::int8 AS day_reserved_micros,
    c.day_requests + coalesce(sum(a.day_requests) FILTER (WHERE a.day_start = c.day_start), 0)::int8 AS day_requests,
    c.day_requests_reserved + coalesce(sum(a.day_requests_reserved) FILTER (WHERE a.day_start = c.day_start), 0)::int8 AS day_requests_reserved,
    c.day_tokens + coalesce(sum(a.day_tokens) FILTER (WHERE a.day_start = c.day_start), 0)::int8 AS day_tokens,
    c.day_tokens_reserved + coalesce(sum(a.day_tokens_reserved) FILTER (WHERE a.day_start = c.day_start), 0)::int8 AS day_tokens_reserved,
    c.month_start,
    c.month_spent_micros + coalesce(sum(a.month_spent_micros) FILTER (WHERE a.month_start = c.month_start), 0)::int8 AS month_spent_micros,
    c.month_reserved_micros + coalesce(sum(a.month_reserved_micros) FILTER (WHERE a.month_start = c.month_start), 0)::int8 AS month_reserved_micros,
    c.month_requests + coalesce(sum(a.month_requests) FILTER (WHERE a.month_start = c.month_start), 0)::int8 AS month_requests,
    c.month_requests_reserved + coalesce(sum(a.month_requests_reserved) FILTER (WHERE a.month_start = c.month_start), 0)::int8 AS month_requests_reserved,
    c.month_tokens + coalesce(sum(a.month_tokens) FILTER (WHERE a.month_start = c.month_start), 0)::int8 AS month_tokens,
    c.month_tokens_reserved + coalesce(sum(a.month_tokens_reserved) FILTER (WHERE a.month_start = c.month_start), 0)::int8 AS month_tokens_reserved,
    c.in_flight + coalesce(sum(a.in_flight), 0)::int8 AS in_flight,
    c.tat,
    c.day_granted_micros, c.month_granted_micros
FROM scope_counters c
LEFT JOIN cluster_allowances a
    ON (a.scope_kind, a.tenant_id, a.scope_id) = (c.scope_kind, c.tenant_id, c.scope_id)
GROUP BY c.scope_kind, c.tenant_id, c.scope_id;
"#,
    ),
    (
        15,
        r#"
-- The view of cluster totals, readable by key: the version of migration 14 grouped every
-- scope's row with its allowances before a reader's keys could narrow it, so reading one
-- scope's totals (`/v1/check`, `/v1/limits` in cluster mode) summed all of them, about
-- 11 ms at 5,000 scopes and growing with them. Here each row's allowances are summed
-- beside it (a lateral aggregate, through an index on the scope), so a reader's keys
-- reach `scope_counters`' primary key. The columns and what they hold are unchanged.
CREATE INDEX cluster_allowances_scope ON cluster_allowances (scope_kind, tenant_id, scope_id);
CREATE OR REPLACE VIEW cluster_scope_totals AS
SELECT c.scope_kind, c.tenant_id, c.scope_id,
    c.day_start,
    c.day_spent_micros + a.day_spent_micros AS day_spent_micros,
    c.day_reserved_micros + a.day_reserved_micros AS day_reserved_micros,
    c.day_requests + a.day_requests AS day_requests,
    c.day_requests_reserved + a.day_requests_reserved AS day_requests_reserved,
    c.day_tokens + a.day_tokens AS day_tokens,
    c.day_tokens_reserved + a.day_tokens_reserved AS day_tokens_reserved,
    c.month_start,
    c.month_spent_micros + a.month_spent_micros AS month_spent_micros,
    c.month_reserved_micros + a.month_reserved_micros AS month_reserved_micros,
    c.month_requests + a.month_requests AS month_requests,
    c.month_requests_reserved + a.month_requests_reserved AS month_requests_reserved,
    c.month_tokens + a.month_tokens AS month_tokens,
    c.month_tokens_reserved + a.month_tokens_reserved AS month_tokens_reserved,
    c.in_flight + a.in_flight AS in_flight,
    c.tat,
    c.day_granted_micros, c.month_granted_micros
FROM scope_counters c
CROSS JOIN LATERAL (
    SELECT
        coalesce(sum(x.day_spent_micros) FILTER (WHERE x.day_start = c.day_start), 0)::int8 AS day_spent_micros,
        coalesce(sum(x.day_reserved_micros) FILTER (WHERE x.day_start = c.day_start), 0)::int8 AS day_reserved_micros,
        coalesce(sum(x.day_requests) FILTER (WHERE x.day_start = c.day_start), 0)::int8 AS day_requests,
        coalesce(sum(x.day_requests_reserved) FILTER (WHERE x.day_start = c.day_start), 0)::int8 AS day_requests_reserved,
        coalesce(sum(x.day_tokens) FILTER (WHERE x.day_start = c.day_start), 0)::int8 AS day_tokens,
        coalesce(sum(x.day_tokens_reserved) FILTER (WHERE x.day_start = c.day_start), 0)::int8 AS day_tokens_reserved,
        coalesce(sum(x.month_spent_micros) FILTER (WHERE x.month_start = c.month_start), 0)::int8 AS month_spent_micros,
        coalesce(sum(x.month_reserved_micros) FILTER (WHERE x.month_start = c.month_start), 0)::int8 AS month_reserved_micros,
        coalesce(sum(x.month_requests) FILTER (WHERE x.month_start = c.month_start), 0)::int8 AS month_requests,
        coalesce(sum(x.month_requests_reserved) FILTER (WHERE x.month_start = c.month_start), 0)::int8 AS month_requests_reserved,
        coalesce(sum(x.month_tokens) FILTER (WHERE x.month_start = c.month_start), 0)::int8 AS month_tokens,
        coalesce(sum(x.month_tokens_reserved) FILTER (WHERE x.month_start = c.month_start), 0)::int8 AS month_tokens_reserved,
        coalesce(sum(x.in_flight), 0)::int8 AS in_flight
    FROM cluster_allowances x
    WHERE (x.scope_kind, x.tenant_id, x.scope_id) = (c.scope_kind, c.tenant_id, c.scope_id)
) a;
"#,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_ascend_without_gaps() {
        for list in [SQLITE, POSTGRES] {
            for (i, (v, _)) in list.iter().enumerate() {
                assert_eq!(*v, i as i64 + 1);
            }
        }
    }
}
