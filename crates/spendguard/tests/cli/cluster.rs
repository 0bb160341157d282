//! Cluster mode with real processes: several `spendguard serve --mode cluster` on one
//! PostgreSQL schema, driven over HTTP, some of them killed with SIGKILL or cut off from
//! the database mid-load.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{ADMIN, KillOnDrop, pg_url, spawn_serving};

/// 200 reservations of 0.01 fit the global budget.
const CONFIG: &str = r#"
reservation_ttl_seconds = 3
[cluster]
lease_seconds = 2
[global]
usd_per_day = "2"
usd_per_month = "1000"
[tenant]
max_share_of_global = 1.0
[tiers.free]
requests_per_minute = "unlimited"
requests_per_day = "unlimited"
tokens_per_day = "unlimited"
usd_per_day = "1"
usd_per_month = "10"
max_concurrent = "unlimited"
allowed_models = ["*"]
"#;

/// A fresh schema; returns the admin connection's URL with the schema as search path.
fn fresh_schema(rt: &tokio::runtime::Runtime, url: &str, name: &str) -> String {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let schema = format!("sg_cli_cluster_{name}_{}", std::process::id());
    rt.block_on(async {
        let (admin, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .await
            .unwrap();
    });
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

/// One `serve --mode cluster` process in its own directory (its spool), on a free port.
struct Instance {
    child: KillOnDrop,
    addr: String,
    dir: std::path::PathBuf,
}

fn start_instance(dir: &std::path::Path, db_url: &str) -> Instance {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("spendguard.toml"), CONFIG).unwrap();
    let (child, addr) = spawn_serving(
        Command::new(env!("CARGO_BIN_EXE_spendguard"))
            .args(["serve", "--mode", "cluster", "--listen", "127.0.0.1:0"])
            .current_dir(dir)
            .env("SPENDGUARD_DATABASE_URL", db_url)
            .env("SPENDGUARD_ADMIN_KEY", ADMIN),
    );
    Instance {
        child,
        addr,
        dir: dir.to_owned(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

fn reserve_body(tenant: &str, user: &str, usd: &str) -> Value {
    json!({
        "tenant_id": tenant, "user_id": user, "model": "gpt-4o-mini",
        "input_tokens": 10, "max_output_tokens": 10, "estimated_cost_usd": usd,
    })
}

async fn post(c: &reqwest::Client, url: String, body: Value) -> Result<(u16, Value), String> {
    let r = c
        .post(url)
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.map_err(|e| e.to_string())?))
}

/// The shared rows' invariant, read with SQL: for every scope, reserved money and the
/// in-flight count equal the sums over its open reservations, spend equals its records,
/// and the global day never holds more than its budget.
fn assert_rows_keep_the_invariant(rt: &tokio::runtime::Runtime, url: &str, budget_micros: i64) {
    rt.block_on(async {
        let config: tokio_postgres::Config = url.parse().unwrap();
        let (db, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let bad = db
            .query(
                "SELECT c.scope_kind, c.tenant_id, c.scope_id, c.day_reserved_micros, o.reserved, \
                 c.in_flight, o.n, c.day_spent_micros, u.spent \
                 FROM cluster_scope_totals c \
                 LEFT JOIN LATERAL (SELECT coalesce(sum(estimate_micros), 0)::int8 AS reserved, \
                   count(*) AS n FROM reservations r WHERE r.state = 'open' AND ( \
                   c.scope_kind = 'global' OR (r.tenant_id = c.tenant_id AND ( \
                   c.scope_kind = 'tenant' OR (c.scope_kind = 'user' AND r.user_id = c.scope_id) \
                   OR (c.scope_kind = 'company' AND r.company_id = c.scope_id))))) o ON true \
                 LEFT JOIN LATERAL (SELECT coalesce(sum(cost_usd * 1000000), 0)::int8 AS spent \
                   FROM ai_usage a WHERE a.request_status <> 'expired' AND ( \
                   c.scope_kind = 'global' OR (a.tenant_id = c.tenant_id AND ( \
                   c.scope_kind = 'tenant' OR (c.scope_kind = 'user' AND a.user_id = c.scope_id) \
                   OR (c.scope_kind = 'company' AND a.company_id = c.scope_id))))) u ON true \
                 WHERE c.day_reserved_micros <> o.reserved OR c.in_flight <> o.n \
                   OR c.day_spent_micros <> u.spent",
                &[],
            )
            .await
            .unwrap();
        let bad: Vec<String> = bad.iter().map(|r| format!("{r:?}")).collect();
        assert!(bad.is_empty(), "rows that break the invariant: {bad:#?}");
        // What a row granted is what its allowances hold, window by window.
        let bad = db
            .query(
                "SELECT c.scope_kind, c.tenant_id, c.scope_id, c.day_granted_micros, \
                 c.month_granted_micros FROM scope_counters c LEFT JOIN cluster_allowances a \
                 ON (a.scope_kind, a.tenant_id, a.scope_id) = (c.scope_kind, c.tenant_id, \
                 c.scope_id) GROUP BY 1, 2, 3 HAVING c.day_granted_micros <> coalesce(sum( \
                 a.day_granted_micros) FILTER (WHERE a.day_start = c.day_start), 0) \
                 OR c.month_granted_micros <> coalesce(sum(a.month_granted_micros) \
                 FILTER (WHERE a.month_start = c.month_start), 0)",
                &[],
            )
            .await
            .unwrap();
        let bad: Vec<String> = bad.iter().map(|r| format!("{r:?}")).collect();
        assert!(bad.is_empty(), "grants that are not held: {bad:#?}");
        let g = db
            .query_one(
                "SELECT day_spent_micros + day_reserved_micros FROM cluster_scope_totals \
                 WHERE scope_kind = 'global'",
                &[],
            )
            .await
            .unwrap();
        let used: i64 = g.get(0);
        assert!(used <= budget_micros, "global: {used} > {budget_micros}");
    });
}

/// Waits (bounded) until no busy scope holds a request's worth (0.01) idle in the
/// instances' allowances of the current day, which their heartbeats' folds bring about: a
/// request is then decided on all that is free.
async fn wait_until_nothing_idle(url: &str) {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let (db, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let idle: i64 = db
            .query_one(
                "SELECT coalesce(max(idle), 0)::int8 FROM (SELECT sum(greatest( \
                 a.day_granted_micros - a.day_spent_micros - a.day_reserved_micros, 0)) AS idle \
                 FROM cluster_allowances a JOIN scope_counters c \
                 ON (c.scope_kind, c.tenant_id, c.scope_id) = (a.scope_kind, a.tenant_id, \
                 a.scope_id) AND c.day_start = a.day_start GROUP BY a.scope_kind, \
                 a.tenant_id, a.scope_id) s",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if idle < 10_000 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "allowances kept {idle} micro-USD idle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn get_json(rt: &tokio::runtime::Runtime, url: String) -> Value {
    rt.block_on(async {
        reqwest::Client::new()
            .get(url)
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    })
}

#[test]
fn three_cluster_processes_admit_exactly_the_budget_and_settle_anywhere() {
    let Some(url) = pg_url() else { return };
    let rt = runtime();
    let db = fresh_schema(&rt, &url, "exact");
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Instance> = (0..3)
        .map(|i| start_instance(&dir.path().join(format!("i{i}")), &db))
        .collect();
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let c = reqwest::Client::new();
    // 600 reservations at once, round robin over the three; the budget admits 200.
    let mut admitted: Vec<String> = rt.block_on(async {
        let tasks: Vec<_> = (0..600)
            .map(|i| {
                let (c, url) = (
                    c.clone(),
                    format!("http://{}/v1/reservations", addrs[i % 3]),
                );
                tokio::spawn(async move {
                    post(
                        &c,
                        url,
                        reserve_body(&format!("t{}", i % 5), &format!("u{i}"), "0.01"),
                    )
                    .await
                    .unwrap()
                })
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            let (status, body) = t.await.unwrap();
            match status {
                201 => ids.push(body["reservation_id"].as_str().unwrap().to_owned()),
                429 => assert_eq!(body["error"]["code"], "budget_exceeded", "{body}"),
                other => panic!("{other}: {body}"),
            }
        }
        ids
    });
    // Never more than the budget; fewer only by capacity idle in other instances'
    // allowances (the documented bound: at most a sixth of the free capacity each), which
    // comes back within a heartbeat: retried, exactly the budget is admitted.
    let burst = admitted.len();
    eprintln!("the burst admitted {burst} of 200");
    assert!((200 - 66..=200).contains(&burst), "admitted {burst}");
    assert_rows_keep_the_invariant(&rt, &db, 2_000_000);
    rt.block_on(async {
        let mut refused = false;
        for i in 0.. {
            let url = format!("http://{}/v1/reservations", addrs[i % 3]);
            let (status, body) = post(&c, url, reserve_body("t0", &format!("w{i}"), "0.01"))
                .await
                .unwrap();
            match status {
                201 => {
                    admitted.push(body["reservation_id"].as_str().unwrap().to_owned());
                    refused = false;
                }
                429 if refused => break,
                429 => {
                    refused = true;
                    wait_until_nothing_idle(&db).await;
                }
                other => panic!("{other}: {body}"),
            }
        }
    });
    assert_eq!(admitted.len(), 200, "admitted across three instances");
    assert_rows_keep_the_invariant(&rt, &db, 2_000_000);
    // Settled on another instance than the one that made it; a quarter released.
    rt.block_on(async {
        for (i, id) in admitted.iter().enumerate() {
            let at = &addrs[(i + 1) % 3];
            let (status, body) = if i % 4 == 0 {
                post(
                    &c,
                    format!("http://{at}/v1/reservations/{id}/release"),
                    json!({}),
                )
                .await
            } else {
                post(
                    &c,
                    format!("http://{at}/v1/reservations/{id}/commit"),
                    json!({ "input_tokens": 10, "output_tokens": 10, "cost_usd": "0.005" }),
                )
                .await
            }
            .unwrap();
            assert_eq!(status, 200, "{body}");
        }
        // A retried commit on a third instance answers the first one.
        let id = &admitted[1];
        let (status, body) = post(
            &c,
            format!("http://{}/v1/reservations/{id}/commit", addrs[0]),
            json!({ "input_tokens": 10, "output_tokens": 10, "cost_usd": "0.005" }),
        )
        .await
        .unwrap();
        assert_eq!(
            (status, body["replayed"].as_bool()),
            (200, Some(true)),
            "{body}"
        );
    });
    assert_rows_keep_the_invariant(&rt, &db, 2_000_000);
    // What every instance shows agrees: 150 × 0.005 spent.
    for a in &addrs {
        let limits = get_json(
            &rt,
            format!("http://{a}/v1/limits?tenant_id=t0&user_id=someone"),
        );
        let global = limits["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["scope"] == "global" && l["window"] == "day" && l["unit"] == "usd")
            .unwrap()
            .clone();
        assert_eq!(global["used"].as_f64(), Some(0.75), "{a}: {global}");
        assert_eq!(global["reserved"].as_f64(), Some(0.0), "{a}: {global}");
    }
    // A budget set through instance 0 is enforced by instance 2 after its next heartbeat.
    rt.block_on(async {
        let r = c
            .put(format!(
                "http://{}/v1/admin/budgets/user/capped?tenant_id=t1",
                addrs[0]
            ))
            .bearer_auth(ADMIN)
            .json(&json!({ "daily_usd": "0.02" }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let set = Instant::now();
        loop {
            let (status, body) = post(
                &c,
                format!("http://{}/v1/check", addrs[2]),
                reserve_body("t1", "capped", "0.03"),
            )
            .await
            .unwrap();
            assert_eq!(status, 200, "{body}");
            if body["allowed"] == json!(false) {
                break;
            }
            assert!(
                set.elapsed() < Duration::from_secs(10),
                "instance 2 never enforced the new budget"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let cluster = get_json(&rt, format!("http://{}/v1/admin/cluster", addrs[1]));
    assert_eq!(cluster["mode"], "cluster");
    let live = cluster["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["live"] == json!(true))
        .count();
    assert_eq!(live, 3, "{cluster}");
    assert!(cluster["stats"]["batches"].as_u64().unwrap() > 0);
    assert_eq!(cluster["allowance_scopes"], json!(["global", "tenant"]));
    let top_ups: u64 = addrs
        .iter()
        .map(|a| {
            get_json(&rt, format!("http://{a}/v1/admin/cluster"))["stats"]["allowance_top_ups"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(top_ups > 0, "no instance took an allowance");
    assert!(cluster["stats"]["false_denials"].is_u64(), "{cluster}");
    let metrics = rt.block_on(async {
        c.get(format!("http://{}/metrics", addrs[1]))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert!(
        metrics.contains("spendguard_cluster_batches_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("spendguard_cluster_heartbeat_up 1"),
        "{metrics}"
    );
    for name in [
        "spendguard_cluster_allowance_top_ups_total",
        "spendguard_cluster_allowance_returns_total",
        "spendguard_cluster_allowance_reclaims_total",
        "spendguard_cluster_allowance_denials_total",
        "spendguard_cluster_false_denials_total",
        "spendguard_cluster_live_instances 3",
    ] {
        assert!(metrics.contains(name), "{name}: {metrics}");
    }
    // A dashboard session opened on one instance is valid on the others, and signing out
    // on any ends it everywhere.
    rt.block_on(async {
        let c = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let r = c
            .post(format!("http://{}/login", addrs[0]))
            .form(&[("key", ADMIN)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 303);
        let cookie = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("spendguard_session="))
            .expect("a session cookie")
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let page = |at: String| {
            let (c, cookie) = (c.clone(), cookie.clone());
            async move {
                let r = c.get(at).header("cookie", cookie).send().await.unwrap();
                r.status().as_u16()
            }
        };
        assert_eq!(page(format!("http://{}/alerts", addrs[1])).await, 200);
        assert_eq!(page(format!("http://{}/alerts", addrs[2])).await, 200);
        let r = c
            .post(format!("http://{}/logout", addrs[2]))
            .header("cookie", cookie.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 303);
        for a in &addrs {
            assert_eq!(page(format!("http://{a}/alerts")).await, 303, "{a}");
        }
    });
    drop(nodes);
}

/// Concurrent load tasks, each with at most one request in flight.
const LOAD_TASKS: usize = 12;

/// What the load saw: acknowledged commits, and reservations admitted and not admitted.
#[derive(Default)]
struct Acked {
    usage_ids: Mutex<Vec<String>>,
    admitted: std::sync::atomic::AtomicU64,
    not_admitted: std::sync::atomic::AtomicU64,
}

impl Acked {
    fn acked(&self) -> usize {
        self.usage_ids.lock().unwrap().len()
    }

    /// Waits (bounded) until `n` commits were acknowledged.
    fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked() < n {
            assert!(Instant::now() < deadline, "the load stalled");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Reserve→commit cycles against `addrs` (each task pinned to one) until `stop`.
fn run_load(
    rt: &tokio::runtime::Runtime,
    addrs: Arc<Mutex<Vec<String>>>,
    acked: Arc<Acked>,
    stop: Arc<AtomicBool>,
    tasks: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..tasks)
        .map(|t| {
            let (addrs, acked, stop) = (addrs.clone(), acked.clone(), stop.clone());
            rt.spawn(async move {
                let c = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let a = addrs.lock().unwrap()[t % 3].clone();
                    let body = reserve_body(&format!("t{}", t % 4), &format!("w{t}-{n}"), "0.0001");
                    let Ok((201, r)) = post(&c, format!("http://{a}/v1/reservations"), body).await
                    else {
                        acked.not_admitted.fetch_add(1, Ordering::Relaxed);
                        // Not a wait for a result: a pause before trying again, so that
                        // an instance that is down is not hammered.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    acked.admitted.fetch_add(1, Ordering::Relaxed);
                    let id = r["reservation_id"].as_str().unwrap().to_owned();
                    let commit =
                        json!({ "input_tokens": 5, "output_tokens": 5, "cost_usd": "0.0001" });
                    if let Ok((200, u)) = post(
                        &c,
                        format!("http://{a}/v1/reservations/{id}/commit"),
                        commit,
                    )
                    .await
                    {
                        let uid = u["usage_id"].as_str().unwrap().to_owned();
                        acked.usage_ids.lock().unwrap().push(uid);
                    }
                }
            })
        })
        .collect()
}

/// Reads every usage id stored, and waits (bounded) until no reservation is open: those
/// the killed instance's clients never settled expire by their TTL on the live ones.
fn stored_usage_once_all_settled(rt: &tokio::runtime::Runtime, url: &str) -> Vec<String> {
    rt.block_on(async {
        let config: tokio_postgres::Config = url.parse().unwrap();
        let (db, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let open: i64 = db
                .query_one(
                    "SELECT count(*) FROM reservations WHERE state = 'open'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if open == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{open} reservations never expired"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        db.query(
            "SELECT id::text FROM ai_usage WHERE request_status <> 'expired'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    })
}

/// Stops the load, then checks that every acknowledged commit is stored once and that the
/// rows keep their invariant.
fn stop_and_check(
    rt: &tokio::runtime::Runtime,
    load: Vec<tokio::task::JoinHandle<()>>,
    stop: &AtomicBool,
    acked: &Acked,
    db: &str,
) {
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for t in load {
            t.await.unwrap();
        }
    });
    let stored = stored_usage_once_all_settled(rt, db);
    check_acknowledged(acked, &stored);
    assert_rows_keep_the_invariant(rt, db, 2_000_000);
}

fn check_acknowledged(acked: &Acked, stored: &[String]) {
    let acked = acked.usage_ids.lock().unwrap();
    let stored_set: HashSet<&String> = stored.iter().collect();
    assert_eq!(stored_set.len(), stored.len(), "a record stored twice");
    let missing: Vec<&String> = acked.iter().filter(|u| !stored_set.contains(u)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?}"
    );
    assert!(acked.len() > 100, "too little load: {}", acked.len());
}

#[test]
fn a_cluster_process_killed_mid_load_loses_nothing_acknowledged() {
    let Some(url) = pg_url() else { return };
    let rt = runtime();
    let db = fresh_schema(&rt, &url, "kill");
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Instance> = (0..3)
        .map(|i| start_instance(&dir.path().join(format!("i{i}")), &db))
        .collect();
    let addrs = Arc::new(Mutex::new(
        nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>(),
    ));
    let (acked, stop) = (Arc::new(Acked::default()), Arc::new(AtomicBool::new(false)));
    let load = run_load(&rt, addrs.clone(), acked.clone(), stop.clone(), LOAD_TASKS);
    acked.wait_for(200);
    let killed_id = get_json(&rt, format!("http://{}/v1/admin/cluster", nodes[1].addr))["instance"]
        ["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // SIGKILL instance 1 mid-load, then start it again in its directory.
    let killed = nodes.remove(1);
    let killed_dir = killed.dir.clone();
    let mut child = killed.child;
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let killed_at = Instant::now();
    // Its allowances come back to the rows once its lease (2 s) lapsed: taken back by a
    // live instance.
    rt.block_on(async {
        let config: tokio_postgres::Config = db.parse().unwrap();
        let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        loop {
            let held: i64 = client
                .query_one(
                    "SELECT count(*) FROM cluster_allowances WHERE instance_id::text = $1",
                    &[&killed_id],
                )
                .await
                .unwrap()
                .get(0);
            if held == 0 {
                break;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(30),
                "the killed instance's allowances never came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    eprintln!(
        "the killed instance's allowances came back {:?} after the kill (lease 2 s)",
        killed_at.elapsed()
    );
    acked.wait_for(400);
    let again = start_instance(&killed_dir, &db);
    addrs.lock().unwrap()[1] = again.addr.clone();
    nodes.insert(1, again);
    acked.wait_for(700);
    stop_and_check(&rt, load, &stop, &acked, &db);
    drop(nodes);
}

/// A TCP proxy to `upstream` that, when cut, closes every connection it carries and
/// refuses new ones until it is joined again.
struct Cuttable {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Cuttable {
    fn new(upstream: SocketAddr) -> Cuttable {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (flag, streams) = (up.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !flag.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let mut held = streams.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Cuttable { addr, up, open }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn join(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[test]
fn postgres_cut_off_under_load_overspends_nothing_and_loses_nothing() {
    let Some(url) = pg_url() else { return };
    let rt = runtime();
    let db = fresh_schema(&rt, &url, "outage");
    let config: tokio_postgres::Config = url.parse().unwrap();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let upstream: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let proxy = Cuttable::new(upstream);
    let user = config.get_user().unwrap_or("postgres");
    let name = config.get_dbname().unwrap_or("test");
    let schema = db.rsplit("%3D").next().unwrap();
    let via_proxy = format!(
        "postgres://{user}@{}/{name}?options=-csearch_path%3D{schema}&connect_timeout=2",
        proxy.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Instance> = (0..3)
        .map(|i| start_instance(&dir.path().join(format!("i{i}")), &via_proxy))
        .collect();
    let addrs = Arc::new(Mutex::new(
        nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>(),
    ));
    let (acked, stop) = (Arc::new(Acked::default()), Arc::new(AtomicBool::new(false)));
    let load = run_load(&rt, addrs.clone(), acked.clone(), stop.clone(), LOAD_TASKS);
    acked.wait_for(200);
    proxy.cut();
    // While PostgreSQL cannot be reached, nothing is admitted: every instance decides on
    // the shared rows only (503), and reports it is not ready.
    let (acked_at_cut, admitted_at_cut) = (acked.acked(), acked.admitted.load(Ordering::Relaxed));
    // The load keeps trying meanwhile: wait until it was refused 200 more times.
    let refused_at_cut = acked.not_admitted.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.not_admitted.load(Ordering::Relaxed) < refused_at_cut + 200 {
        assert!(Instant::now() < deadline, "the load stopped trying");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = rt.block_on(async {
        reqwest::Client::new()
            .post(format!(
                "http://{}/v1/reservations",
                addrs.lock().unwrap()[0]
            ))
            .bearer_auth(ADMIN)
            .json(&reserve_body("t0", "during", "0.0001"))
            .send()
            .await
            .unwrap()
    });
    assert_eq!(r.status().as_u16(), 503);
    // Only what was in flight at the cut (one request per load task) was answered since.
    let (acked_now, admitted_now) = (acked.acked(), acked.admitted.load(Ordering::Relaxed));
    assert!(
        acked_now - acked_at_cut <= LOAD_TASKS,
        "{acked_at_cut} → {acked_now} commits"
    );
    assert!(
        admitted_now - admitted_at_cut <= LOAD_TASKS as u64,
        "{admitted_at_cut} → {admitted_now} admitted while PostgreSQL was unreachable"
    );
    proxy.join();
    acked.wait_for(acked_now + 300);
    stop_and_check(&rt, load, &stop, &acked, &db);
    drop(nodes);
}
