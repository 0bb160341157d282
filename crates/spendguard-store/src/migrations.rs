//! Versioned schema migrations, one numbered list per backend.
//!
//! A store records each applied version in `schema_migrations(version, applied_at)` and, when
//! opened, applies the missing ones in order, each in its own transaction. Released
//! migrations are never edited: a change is a new, higher version.

/// A numbered migration: its version and its SQL.
pub(crate) type Migration = (i64, &'static str);

/// SQLite: instants are integer microseconds since the Unix epoch; money is integer micros.
pub(crate) const SQLITE: &[Migration] = &[(
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
)];

/// PostgreSQL: instants are `timestamptz`, `ai_usage.cost_usd` is `NUMERIC(19,6)` (every
/// `i64` of micro-USD fits), other money is `bigint` micros.
pub(crate) const POSTGRES: &[Migration] = &[(
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
)];

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
