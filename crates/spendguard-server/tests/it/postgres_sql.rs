//! PostgreSQL's row-level security and the seed's SQL functions (migration 7), as an
//! application's role sees them: a server runs as the role that owns its schema (not a
//! superuser, no BYPASSRLS), spends for two tenants through the API, and a role that does
//! not own the tables reads them with SQL. It sees only the rows of the tenant it names,
//! writes nothing, and the functions answer what the API answers. The Supabase variant of
//! the policies in `docs/postgresql.md` is run as written and checked the same way.

use serde_json::{Value, json};
use spendguard_store::{AnyStore, OpenOptions};
use tokio_postgres::{Client, NoTls};

use crate::support::{ADMIN, TestServer, skipped, spawn_at};

/// Free-tier users without limits of their own; days in New York (the functions must count
/// them in the database's time zone).
const CONFIG: &str = r#"
time_zone = "America/New_York"

[tiers.free]
requests_per_minute = "unlimited"
requests_per_day = "unlimited"
usd_per_day = "unlimited"
usd_per_month = "unlimited"
max_concurrent = "unlimited"
allowed_models = ["*"]
"#;

/// The server's day (`T0` is 2026-03-10T12:00Z, 08:00 in New York).
const DAY: &str = "2026-03-10";
/// `T0` as an instant PostgreSQL reads.
const AT: &str = "2026-03-10T12:00:00Z";

/// The schema and the two roles of one test run, dropped when it ends (also on a panic).
struct Scratch {
    url: String,
    schema: String,
    owner: String,
    app: String,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let (url, schema, owner, app) = (
            self.url.clone(),
            self.schema.clone(),
            self.owner.clone(),
            self.app.clone(),
        );
        // Its own thread and runtime: works during a panic and inside the test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((client, conn)) = tokio_postgres::connect(&url, NoTls).await {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!(
                            // Not for ever behind a transaction a failed test left open
                            // (its runtime is blocked here): the test fails instead.
                            "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {schema} CASCADE; \
                             DROP ROLE IF EXISTS {app}; DROP ROLE IF EXISTS {owner}"
                        ))
                        .await;
                }
            });
        })
        .join();
    }
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// A URL of the test database as `user`, with `options` (URL-encoded) for the session.
fn url_as(base: &str, user: &str, options: &str) -> String {
    let config: tokio_postgres::Config = base.parse().unwrap();
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap_or("postgres");
    format!("postgres://{user}@{host}:{port}/{db}?options={options}")
}

/// The application's session: the role `app` (through `SET ROLE`), the test's schema.
async fn app_session(s: &Scratch) -> Client {
    let client = connect(&s.url).await;
    client
        .batch_execute(&format!(
            "SET ROLE {}; SET search_path = {}",
            s.app, s.schema
        ))
        .await
        .unwrap();
    client
}

async fn count(client: &Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// The distinct tenants of a table's rows as `client` sees them.
async fn tenants(client: &Client, table: &str) -> Vec<String> {
    client
        .query(
            &format!("SELECT DISTINCT tenant_id FROM {table} ORDER BY 1"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `get_user_daily_ai_usage` as the API's JSON shape: `{totals, models}`.
async fn sql_day(client: &Client, user: &str, day: &str, tenant: Option<&str>) -> Value {
    let rows = client
        .query(
            "SELECT model, requests, input_tokens, cached_input_tokens, output_tokens, \
             total_tokens, cost_usd::float8 \
             FROM get_user_daily_ai_usage($1, $2::text::date, $3)",
            &[&user, &day, &tenant],
        )
        .await
        .unwrap();
    let sums = |r: &tokio_postgres::Row| {
        json!({
            "requests": r.get::<_, i64>(1),
            "input_tokens": r.get::<_, i64>(2),
            "cached_input_tokens": r.get::<_, i64>(3),
            "output_tokens": r.get::<_, i64>(4),
            "total_tokens": r.get::<_, i64>(5),
            "cost_usd": r.get::<_, f64>(6),
        })
    };
    let (first, rest) = rows.split_first().expect("the totals row is always there");
    assert_eq!(
        first.get::<_, Option<String>>(0),
        None,
        "the totals row is first"
    );
    let models: Vec<Value> = rest
        .iter()
        .map(|r| {
            let mut v = sums(r);
            v["model"] = json!(r.get::<_, Option<String>>(0).expect("a model row"));
            v
        })
        .collect();
    json!({ "totals": sums(first), "models": models })
}

/// The API's answer in the same shape.
async fn api_day(s: &TestServer, tenant: &str, user: &str) -> Value {
    let (st, v) = s
        .get(
            &format!("/v1/users/{user}/daily-usage?tenant_id={tenant}&date={DAY}"),
            ADMIN,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    json!({ "totals": v["totals"], "models": v["models"] })
}

/// `get_ai_cost_alerts` at `T0`: `(id, kind, scope, scope_id, tenant_id, window,
/// threshold, amount, limit)` of each, in order.
async fn sql_alerts(client: &Client) -> Vec<Value> {
    client
        .query(
            "SELECT id, kind, scope, scope_id, tenant_id, \"window\", threshold_percent, \
             amount_usd::float8, limit_usd::float8 FROM get_ai_cost_alerts($1::text::timestamptz)",
            &[&AT],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            json!([
                r.get::<_, i64>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(3),
                r.get::<_, Option<String>>(4),
                r.get::<_, String>(5),
                r.get::<_, i32>(6),
                r.get::<_, f64>(7),
                r.get::<_, f64>(8),
            ])
        })
        .collect()
}

/// `GET /v1/alerts` with `key`, in the shape of [`sql_alerts`].
async fn api_alerts(s: &TestServer, key: &str) -> Vec<Value> {
    let (st, v) = s.get("/v1/alerts", key).await;
    assert_eq!(st, 200, "{v}");
    v["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            json!([
                a["id"],
                a["kind"],
                a["scope"],
                a["scope_id"],
                a["tenant_id"],
                a["window"],
                a["threshold_percent"],
                a["amount_usd"],
                a["limit_usd"]
            ])
        })
        .collect()
}

async fn spend(s: &TestServer) {
    // acme/alice: a reserved call committed with tokens, and two direct records.
    let (st, v) = s
        .post(
            "/v1/reservations",
            ADMIN,
            json!({
                "tenant_id": "acme", "user_id": "alice", "model": "gpt-4o-mini",
                "input_tokens": 1000, "max_output_tokens": 500,
            }),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let id = v["reservation_id"].as_str().unwrap().to_owned();
    let (st, v) = s
        .post(
            &format!("/v1/reservations/{id}/commit"),
            ADMIN,
            json!({ "input_tokens": 1000, "cached_input_tokens": 200, "output_tokens": 120 }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    for (tenant, user, model, cost) in [
        ("acme", "alice", "claude-haiku-4-5", None),
        ("acme", "alice", "gpt-4o-mini", Some("0.5")),
        ("acme", "bob", "gpt-4o", Some("0.3")),
        ("globex", "alice", "gpt-4o-mini", Some("0.6")),
    ] {
        let mut body = json!({
            "tenant_id": tenant, "user_id": user, "model": model,
            "input_tokens": 300, "cached_input_tokens": 100, "output_tokens": 80,
        });
        if let Some(c) = cost {
            body["cost_usd"] = json!(c);
        }
        let (st, v) = s.post("/v1/usage", ADMIN, body).await;
        assert_eq!(st, 201, "{v}");
    }
    // Daily budgets of $1 per tenant: acme is over 80% of its, globex over 50%.
    for tenant in ["acme", "globex"] {
        let (st, v, _) = s
            .call(
                reqwest::Method::PUT,
                &format!("/v1/admin/budgets/tenant/{tenant}"),
                Some(ADMIN),
                Some(json!({ "daily_usd": "1" })),
            )
            .await;
        assert_eq!(st, 200, "{v}");
    }
    s.state.alerts.evaluate().await.unwrap();
}

/// The `sql` block after the `<!-- supabase-policies -->` marker of docs/postgresql.md.
fn supabase_policies() -> String {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/postgresql.md"
    ))
    .unwrap();
    let start = doc
        .find("<!-- supabase-policies -->")
        .expect("docs/postgresql.md marks the Supabase policies");
    let rest = &doc[start..];
    let open = rest
        .find("```sql\n")
        .expect("a ```sql block after the marker")
        + 7;
    let len = rest[open..].find("\n```").expect("the block is closed");
    rest[open..open + len].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rls_shows_a_tenant_its_rows_and_the_sql_functions_match_the_api() {
    let url = match std::env::var("SPENDGUARD_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            skipped("skipped a PostgreSQL test");
            return;
        }
    };
    let id = std::process::id();
    let s = Scratch {
        url: url.clone(),
        schema: format!("sg_rls_{id}"),
        owner: format!("sg_rls_owner_{id}"),
        app: format!("sg_rls_app_{id}"),
    };
    let sup = connect(&url).await;
    sup.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; DROP ROLE IF EXISTS {app}; \
         DROP ROLE IF EXISTS {owner}; \
         CREATE ROLE {owner} LOGIN NOSUPERUSER NOBYPASSRLS; \
         CREATE ROLE {app} NOLOGIN NOSUPERUSER NOBYPASSRLS; \
         CREATE SCHEMA {schema} AUTHORIZATION {owner}",
        schema = s.schema,
        owner = s.owner,
        app = s.app
    ))
    .await
    .unwrap();

    // spendguard runs as the schema's owner: row-level security does not apply to it, so
    // it reads and writes every tenant's rows.
    let server = spawn_at(
        &url_as(&url, &s.owner, &format!("-csearch_path%3D{}", s.schema)),
        CONFIG,
    )
    .await;
    spend(&server).await;
    // Acknowledged writes reach the tables through the journal's projection.
    server.projected().await;
    let acme_key = server.tenant_key("acme").await;

    // The application's role: granted what docs/postgresql.md says, and more (every table,
    // INSERT too), to show the policies are what holds.
    sup.batch_execute(&format!(
        "GRANT USAGE ON SCHEMA {schema} TO {app}; \
         GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA {schema} TO {app}",
        schema = s.schema,
        app = s.app
    ))
    .await
    .unwrap();

    // The owner (spendguard's role) sees everything.
    let owner = connect(&url).await;
    owner
        .batch_execute(&format!(
            "SET ROLE {}; SET search_path = {}",
            s.owner, s.schema
        ))
        .await
        .unwrap();
    assert_eq!(count(&owner, "ai_usage").await, 5);
    assert_eq!(tenants(&owner, "ai_usage").await, ["acme", "globex"]);
    assert!(count(&owner, "api_keys").await >= 1);

    let app = app_session(&s).await;
    // No tenant named: nothing.
    for table in [
        "ai_usage",
        "rollups",
        "usage_rollups",
        "reservations",
        "alerts",
        "budget_overrides",
        "api_keys",
    ] {
        assert_eq!(count(&app, table).await, 0, "{table} without a tenant");
    }
    assert_eq!(sql_alerts(&app).await, Vec::<Value>::new());

    // acme: its rows only; never key hashes; no writes.
    app.batch_execute("SET spendguard.tenant_id = 'acme'")
        .await
        .unwrap();
    assert_eq!(count(&app, "ai_usage").await, 4);
    for table in [
        "ai_usage",
        "rollups",
        "usage_rollups",
        "reservations",
        "alerts",
        "budget_overrides",
    ] {
        assert_eq!(tenants(&app, table).await, ["acme"], "{table}");
    }
    assert_eq!(count(&app, "api_keys").await, 0);
    let err = app
        .batch_execute(
            "INSERT INTO ai_usage (id, user_id, tenant_id, model, subscription_tier, \
             input_tokens, cached_input_tokens, output_tokens, cost_usd, request_status, \
             created_at, day_start, month_start) VALUES (gen_random_uuid(), 'mallory', \
             'acme', 'gpt-4o', 'free', 0, 0, 0, 0, 'success', now(), 0, 0)",
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("row-level security") || format!("{err:?}").contains("42501"),
        "{err:?}"
    );
    assert_eq!(count(&owner, "ai_usage").await, 5, "the insert was refused");

    // The functions, as acme: what the API answers for acme.
    let acme_alice = api_day(&server, "acme", "alice").await;
    assert_eq!(acme_alice["totals"]["requests"], 3, "{acme_alice}");
    assert_eq!(acme_alice["models"].as_array().unwrap().len(), 2);
    assert_eq!(sql_day(&app, "alice", DAY, None).await, acme_alice);
    assert_eq!(sql_day(&app, "alice", DAY, Some("acme")).await, acme_alice);
    assert_eq!(
        sql_day(&app, "bob", DAY, None).await,
        api_day(&server, "acme", "bob").await
    );
    // Another tenant's user, or another day: an empty day (the totals row, zero).
    let empty = json!({
        "totals": {"requests": 0, "input_tokens": 0, "cached_input_tokens": 0,
                   "output_tokens": 0, "total_tokens": 0, "cost_usd": 0.0},
        "models": [],
    });
    assert_eq!(sql_day(&app, "alice", DAY, Some("globex")).await, empty);
    assert_eq!(sql_day(&app, "alice", "2026-03-11", None).await, empty);
    assert_eq!(sql_day(&app, "alice", "2026-03-09", None).await, empty);
    let acme_alerts = api_alerts(&server, &acme_key).await;
    assert!(!acme_alerts.is_empty());
    assert_eq!(sql_alerts(&app).await, acme_alerts);

    // globex: its own.
    app.batch_execute("SET spendguard.tenant_id = 'globex'")
        .await
        .unwrap();
    assert_eq!(count(&app, "ai_usage").await, 1);
    let globex_alice = api_day(&server, "globex", "alice").await;
    assert_eq!(sql_day(&app, "alice", DAY, None).await, globex_alice);
    let globex_alerts = sql_alerts(&app).await;
    assert!(!globex_alerts.is_empty());
    assert!(
        globex_alerts.iter().all(|a| a[4] == json!("globex")),
        "{globex_alerts:?}"
    );

    // The owner reads every tenant: its alerts are the admin key's list.
    assert_eq!(sql_alerts(&owner).await, api_alerts(&server, ADMIN).await);
    assert_eq!(
        sql_day(&owner, "alice", DAY, Some("acme")).await,
        acme_alice
    );
    let both = sql_day(&owner, "alice", DAY, None).await;
    assert_eq!(
        both["totals"]["requests"],
        json!(
            acme_alice["totals"]["requests"].as_i64().unwrap()
                + globex_alice["totals"]["requests"].as_i64().unwrap()
        )
    );

    // spendguard refuses to run as a role that row-level security applies to (here one
    // with every privilege but ownership), rather than see no counters and no rows.
    sup.batch_execute(&format!(
        "GRANT CREATE ON SCHEMA {schema} TO {app}; \
         GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {app}",
        schema = s.schema,
        app = s.app
    ))
    .await
    .unwrap();
    // Connected as the test's (superuser) role, acting as the application's role.
    let superuser = url.parse::<tokio_postgres::Config>().unwrap();
    let superuser = superuser.get_user().unwrap_or("postgres").to_owned();
    let opened = AnyStore::open(
        &url_as(
            &url,
            &superuser,
            &format!("-csearch_path%3D{}%20-crole%3D{}", s.schema, s.app),
        ),
        &OpenOptions {
            take_writer_lock: false,
            ..OpenOptions::default()
        },
    )
    .await;
    let Err(err) = opened else {
        panic!("spendguard opened the store as a role subject to row-level security");
    };
    assert!(err.to_string().contains("row-level security"), "{err}");

    // The Supabase variant, as docs/postgresql.md gives it: the tenant comes from the
    // verified JWT's claims, not from spendguard.tenant_id.
    sup.batch_execute(&format!(
        "SET search_path = {}; {}",
        s.schema,
        supabase_policies()
    ))
    .await
    .unwrap();
    let app = app_session(&s).await;
    app.batch_execute("SET spendguard.tenant_id = 'acme'")
        .await
        .unwrap();
    assert_eq!(
        count(&app, "ai_usage").await,
        0,
        "the setting no longer counts"
    );
    app.batch_execute(
        r#"SET request.jwt.claims = '{"sub": "u1", "role": "authenticated", "app_metadata": {"tenant_id": "globex"}}'"#,
    )
    .await
    .unwrap();
    assert_eq!(tenants(&app, "ai_usage").await, ["globex"]);
    assert_eq!(sql_day(&app, "alice", DAY, None).await, globex_alice);
    app.batch_execute(
        r#"SET request.jwt.claims = '{"sub": "u2", "user_metadata": {"tenant_id": "acme"}}'"#,
    )
    .await
    .unwrap();
    assert_eq!(
        count(&app, "ai_usage").await,
        0,
        "user_metadata (which users may change) does not count"
    );
    // spendguard itself is still not subject to the policies: it goes on writing.
    let (st, v) = server
        .post(
            "/v1/usage",
            ADMIN,
            json!({ "tenant_id": "acme", "user_id": "carol", "model": "gpt-4o-mini",
                    "input_tokens": 1, "output_tokens": 1 }),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    server.projected().await;
    assert_eq!(count(&owner, "ai_usage").await, 6);
    server.stop().await;
    drop(s);
}
