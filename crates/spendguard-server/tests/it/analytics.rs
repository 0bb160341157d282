//! Reports and daily usage, checked against records made through the API, in a time zone
//! whose days do not start at UTC midnight.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::support::{ADMIN, M, error_code, spawn};

/// New York: on 2026-03-09..11 (after the DST change of March 8) local midnight is 04:00Z.
const CONFIG: &str = r#"
time_zone = "America/New_York"
[tiers.free]
requests_per_minute = "unlimited"
usd_per_day = "unlimited"
usd_per_month = "unlimited"
allowed_models = ["*"]
"#;

/// 2026-03-10T00:00:00Z.
const MAR10_UTC: i64 = 1_773_100_800_000_000;
const HOUR: i64 = 3_600_000_000;
const MINUTE: i64 = 60_000_000;

/// One record made through the API, and what the test expects of it.
#[derive(Clone, Debug)]
struct Rec {
    /// The local (New York) date it must be counted on.
    date: &'static str,
    tenant: &'static str,
    company: Option<&'static str>,
    user: &'static str,
    model: &'static str,
    endpoint: Option<&'static str>,
    input: u64,
    cached: u64,
    output: u64,
    cost_micros: i64,
}

fn micros_text(m: i64) -> String {
    format!("{}.{:06}", m / 1_000_000, m % 1_000_000)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Sums {
    requests: u64,
    input: u64,
    cached: u64,
    output: u64,
    cost: i64,
}

impl Sums {
    fn add(&mut self, r: &Rec) {
        self.requests += 1;
        self.input += r.input;
        self.cached += r.cached;
        self.output += r.output;
        self.cost += r.cost_micros;
    }

    fn of(v: &Value) -> Sums {
        let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
        // Money is a JSON number rounded to 6 decimals: back to exact micros.
        let cost = (v["cost_usd"].as_f64().unwrap() * 1e6).round() as i64;
        assert_eq!(n("total_tokens"), n("input_tokens") + n("output_tokens"));
        Sums {
            requests: n("requests"),
            input: n("input_tokens"),
            cached: n("cached_input_tokens"),
            output: n("output_tokens"),
            cost,
        }
    }
}

/// Records `recs` at the given instants (ascending), through `POST /v1/usage`, except the
/// ones marked to go through reserve → commit.
async fn seed(server: &crate::support::TestServer) -> Vec<Rec> {
    let plan: Vec<(i64, bool, Rec)> = vec![
        // 2026-03-10T03:30Z = March 9, 23:30 in New York.
        (
            MAR10_UTC + 3 * HOUR + 30 * MINUTE,
            false,
            Rec {
                date: "2026-03-09",
                tenant: "acme",
                company: Some("c1"),
                user: "u1",
                model: "gpt-4o",
                endpoint: Some("chat"),
                input: 1000,
                cached: 200,
                output: 300,
                cost_micros: 1_250_000,
            },
        ),
        (
            MAR10_UTC + 3 * HOUR + 59 * MINUTE,
            false,
            Rec {
                date: "2026-03-09",
                tenant: "globex",
                company: None,
                user: "u3",
                model: "claude-sonnet-4-5",
                endpoint: None,
                input: 50,
                cached: 0,
                output: 70,
                cost_micros: 333,
            },
        ),
        // 04:00Z: midnight of March 10 in New York.
        (
            MAR10_UTC + 4 * HOUR,
            false,
            Rec {
                date: "2026-03-10",
                tenant: "acme",
                company: Some("c1"),
                user: "u1",
                model: "gpt-4o-mini",
                endpoint: Some("chat"),
                input: 10,
                cached: 0,
                output: 20,
                cost_micros: 10,
            },
        ),
        (
            MAR10_UTC + 12 * HOUR,
            true,
            Rec {
                date: "2026-03-10",
                tenant: "acme",
                company: Some("c2"),
                user: "u2",
                model: "gpt-4o",
                endpoint: Some("embed"),
                input: 4000,
                cached: 1000,
                output: 0,
                cost_micros: 7_000_000,
            },
        ),
        (
            MAR10_UTC + 13 * HOUR,
            false,
            Rec {
                date: "2026-03-10",
                tenant: "acme",
                company: None,
                user: "u1",
                model: "gpt-4o",
                endpoint: None,
                input: 1,
                cached: 0,
                output: 1,
                cost_micros: 2_500_000,
            },
        ),
        (
            MAR10_UTC + 20 * HOUR,
            false,
            Rec {
                date: "2026-03-10",
                tenant: "globex",
                company: Some("g1"),
                user: "u3",
                model: "gpt-4o",
                endpoint: Some("chat"),
                input: 100,
                cached: 10,
                output: 100,
                cost_micros: 3_000_000,
            },
        ),
        // 2026-03-11T03:59Z = March 10, 23:59 local.
        (
            MAR10_UTC + 27 * HOUR + 59 * MINUTE,
            false,
            Rec {
                date: "2026-03-10",
                tenant: "acme",
                company: Some("c1"),
                user: "u2",
                model: "claude-sonnet-4-5",
                endpoint: Some("chat"),
                input: 5,
                cached: 0,
                output: 5,
                cost_micros: 1_000_001,
            },
        ),
        // 2026-03-11T04:00Z = March 11, 00:00 local.
        (
            MAR10_UTC + 28 * HOUR,
            false,
            Rec {
                date: "2026-03-11",
                tenant: "acme",
                company: Some("c1"),
                user: "u1",
                model: "gpt-4o",
                endpoint: Some("chat"),
                input: 7,
                cached: 0,
                output: 9,
                cost_micros: 400_000,
            },
        ),
    ];
    let mut out = Vec::new();
    for (at, reserve, r) in plan {
        server.clock.set(at);
        let mut subject = json!({
            "tenant_id": r.tenant,
            "user_id": r.user,
            "model": r.model,
        });
        if let Some(c) = r.company {
            subject["company_id"] = json!(c);
        }
        if let Some(e) = r.endpoint {
            subject["endpoint"] = json!(e);
        }
        let usage = json!({
            "input_tokens": r.input,
            "cached_input_tokens": r.cached,
            "output_tokens": r.output,
            "cost_usd": micros_text(r.cost_micros),
        });
        if reserve {
            let mut body = subject.clone();
            body["input_tokens"] = json!(r.input);
            body["max_output_tokens"] = json!(100);
            let (s, v) = server.post("/v1/reservations", ADMIN, body).await;
            assert_eq!(s, 201, "{v}");
            let id = v["reservation_id"].as_str().unwrap().to_owned();
            // Committed an hour later: still counted on the day it was admitted.
            server.clock.advance(HOUR);
            let (s, v) = server
                .post(&format!("/v1/reservations/{id}/commit"), ADMIN, usage)
                .await;
            assert_eq!(s, 200, "{v}");
        } else {
            let mut body = subject;
            for (k, v) in usage.as_object().unwrap() {
                body[k] = v.clone();
            }
            let (s, v) = server.post("/v1/usage", ADMIN, body).await;
            assert_eq!(s, 201, "{v}");
        }
        out.push(r);
    }
    // An expired reservation costs nothing and is not a request.
    server.clock.set(MAR10_UTC + 29 * HOUR);
    let mut body = crate::support::reserve_body("acme", "u1");
    body["ttl_seconds"] = json!(1);
    let (s, v) = server.post("/v1/reservations", ADMIN, body).await;
    assert_eq!(s, 201, "{v}");
    server.clock.advance(2_000_000);
    server.state.guard.sweep().await.unwrap();
    out
}

/// A record's group key, as JSON values.
type KeyFn = Box<dyn Fn(&Rec) -> Vec<Value>>;

/// The expected groups of `recs` by `key`.
fn expect(recs: &[Rec], key: impl Fn(&Rec) -> Vec<Value>) -> BTreeMap<String, Sums> {
    let mut m: BTreeMap<String, Sums> = BTreeMap::new();
    for r in recs {
        m.entry(Value::Array(key(r)).to_string())
            .or_default()
            .add(r);
    }
    m
}

fn got(rows: &Value, cols: &[&str]) -> BTreeMap<String, Sums> {
    let mut m = BTreeMap::new();
    for row in rows.as_array().unwrap() {
        let k = Value::Array(cols.iter().map(|c| row[*c].clone()).collect()).to_string();
        assert!(
            m.insert(k, Sums::of(row)).is_none(),
            "duplicate group {row}"
        );
    }
    m
}

fn opt(v: Option<&str>) -> Value {
    v.map_or(Value::Null, |s| json!(s))
}

#[tokio::test]
async fn reports_sum_and_group_records_by_local_day() {
    let server = spawn(CONFIG).await;
    let recs = seed(&server).await;
    let range = "from=2026-03-09&to=2026-03-11";
    let cases: Vec<(&str, Vec<&str>, KeyFn)> = vec![
        ("day", vec!["day"], Box::new(|r: &Rec| vec![json!(r.date)])),
        (
            "tenant",
            vec!["tenant_id"],
            Box::new(|r: &Rec| vec![json!(r.tenant)]),
        ),
        (
            "company",
            vec!["tenant_id", "company_id"],
            Box::new(|r: &Rec| vec![json!(r.tenant), opt(r.company)]),
        ),
        (
            "user",
            vec!["tenant_id", "user_id"],
            Box::new(|r: &Rec| vec![json!(r.tenant), json!(r.user)]),
        ),
        (
            "model",
            vec!["model"],
            Box::new(|r: &Rec| vec![json!(r.model)]),
        ),
        (
            "endpoint",
            vec!["endpoint"],
            Box::new(|r: &Rec| vec![opt(r.endpoint)]),
        ),
    ];
    let mut all = Sums::default();
    recs.iter().for_each(|r| all.add(r));
    for (group, cols, key) in &cases {
        let (s, v) = server
            .get(
                &format!("/v1/reports/usage?{range}&group_by={group}"),
                ADMIN,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["time_zone"], "America/New_York");
        assert_eq!(v["group_by"], *group);
        assert_eq!(
            got(&v["rows"], cols),
            expect(&recs, key),
            "group_by={group}"
        );
        assert_eq!(Sums::of(&v["totals"]), all, "group_by={group}");
        assert_eq!(v["groups"], v["rows"].as_array().unwrap().len());
        // Days come oldest first; the other groupings by spend, largest first.
        let rows = v["rows"].as_array().unwrap();
        if *group == "day" {
            let days: Vec<&str> = rows.iter().map(|r| r["day"].as_str().unwrap()).collect();
            assert_eq!(days, ["2026-03-09", "2026-03-10", "2026-03-11"]);
        } else {
            let costs: Vec<f64> = rows
                .iter()
                .map(|r| r["cost_usd"].as_f64().unwrap())
                .collect();
            assert!(costs.windows(2).all(|w| w[0] >= w[1]), "{costs:?}");
        }
    }

    // Bounds are inclusive whole local days.
    let march10: Vec<Rec> = recs
        .iter()
        .filter(|r| r.date == "2026-03-10")
        .cloned()
        .collect();
    let (s, v) = server
        .get(
            "/v1/reports/usage?from=2026-03-10&to=2026-03-10&group_by=model",
            ADMIN,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        got(&v["rows"], &["model"]),
        expect(&march10, |r| vec![json!(r.model)])
    );

    // Top spenders: the limit cuts the rows, not the totals.
    let (_, v) = server
        .get(
            &format!("/v1/reports/usage?{range}&group_by=user&limit=1"),
            ADMIN,
        )
        .await;
    let users = expect(&recs, |r| vec![json!(r.tenant), json!(r.user)]);
    let top = users.values().map(|s| s.cost).max().unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 1);
    assert_eq!(Sums::of(&v["rows"][0]).cost, top);
    assert_eq!(v["groups"], users.len());
    assert_eq!(Sums::of(&v["totals"]), all);
    server.stop().await;
}

#[tokio::test]
async fn reports_come_as_well_formed_csv() {
    let server = spawn(CONFIG).await;
    let recs = seed(&server).await;
    let resp = server
        .client
        .get(format!(
            "{}/v1/reports/usage?from=2026-03-09&to=2026-03-11&group_by=company&format=csv",
            server.url
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/csv; charset=utf-8"
    );
    assert!(
        resp.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment; filename=\"spendguard-usage-2026-03-09-2026-03-11")
    );
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("\r\n"));
    let lines: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines[0],
        "tenant_id,company_id,requests,input_tokens,cached_input_tokens,output_tokens,total_tokens,cost_usd"
    );
    let expected = expect(&recs, |r| vec![json!(r.tenant), opt(r.company)]);
    assert_eq!(lines.len() - 1, expected.len());
    let mut total_cost = 0i64;
    for line in &lines[1..] {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 8, "{line}");
        let key = Value::Array(vec![
            json!(f[0]),
            if f[1].is_empty() {
                Value::Null
            } else {
                json!(f[1])
            },
        ])
        .to_string();
        let want = expected[&key];
        assert_eq!(f[2].parse::<u64>().unwrap(), want.requests, "{line}");
        // Money in CSV is exact, with 6 decimals.
        assert_eq!(f[7], micros_text(want.cost), "{line}");
        total_cost += want.cost;
    }
    assert_eq!(total_cost, recs.iter().map(|r| r.cost_micros).sum::<i64>());
    server.stop().await;
}

#[tokio::test]
async fn daily_usage_breaks_a_users_day_down_by_model() {
    let server = spawn(CONFIG).await;
    let recs = seed(&server).await;
    let (s, v) = server
        .get(
            "/v1/users/u1/daily-usage?date=2026-03-10&tenant_id=acme",
            ADMIN,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let mine: Vec<Rec> = recs
        .iter()
        .filter(|r| r.tenant == "acme" && r.user == "u1" && r.date == "2026-03-10")
        .cloned()
        .collect();
    assert_eq!(
        got(&v["models"], &["model"]),
        expect(&mine, |r| vec![json!(r.model)])
    );
    let mut total = Sums::default();
    mine.iter().for_each(|r| total.add(r));
    assert_eq!(Sums::of(&v["totals"]), total);
    assert_eq!(v["date"], "2026-03-10");
    assert_eq!(v["time_zone"], "America/New_York");

    // A tenant key reads its own users without naming the tenant, and no other tenant's.
    let acme = server.tenant_key("acme").await;
    let (s, v2) = server
        .get("/v1/users/u1/daily-usage?date=2026-03-10", &acme)
        .await;
    assert_eq!(s, 200, "{v2}");
    assert_eq!(v2["totals"], v["totals"]);
    let (s, e) = server
        .get(
            "/v1/users/u3/daily-usage?date=2026-03-10&tenant_id=globex",
            &acme,
        )
        .await;
    assert_eq!((s, error_code(&e)), (403, "forbidden"));
    // The admin must say which tenant; bad dates are 400.
    let (s, e) = server.get("/v1/users/u1/daily-usage", ADMIN).await;
    assert_eq!((s, error_code(&e)), (400, "invalid_request"));
    let (s, e) = server
        .get(
            "/v1/users/u1/daily-usage?date=10/03/2026&tenant_id=acme",
            ADMIN,
        )
        .await;
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("YYYY-MM-DD")
    );
    server.stop().await;
}

#[tokio::test]
async fn tenant_keys_see_only_their_tenant_in_reports() {
    let server = spawn(CONFIG).await;
    let recs = seed(&server).await;
    let acme = server.tenant_key("acme").await;
    let (s, v) = server
        .get(
            "/v1/reports/usage?from=2026-03-09&to=2026-03-11&group_by=model",
            &acme,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let theirs: Vec<Rec> = recs
        .iter()
        .filter(|r| r.tenant == "acme")
        .cloned()
        .collect();
    assert_eq!(
        got(&v["rows"], &["model"]),
        expect(&theirs, |r| vec![json!(r.model)])
    );
    assert_eq!(v["tenant_id"], "acme");
    let (s, e) = server
        .get("/v1/reports/usage?tenant_id=globex", &acme)
        .await;
    assert_eq!((s, error_code(&e)), (403, "forbidden"));
    // The admin may narrow to one tenant.
    let (_, v) = server
        .get(
            "/v1/reports/usage?from=2026-03-09&to=2026-03-11&group_by=tenant&tenant_id=globex",
            ADMIN,
        )
        .await;
    assert_eq!(v["rows"].as_array().unwrap().len(), 1);
    assert_eq!(v["rows"][0]["tenant_id"], "globex");
    server.stop().await;
}

#[tokio::test]
async fn report_arguments_are_checked() {
    let server = spawn(CONFIG).await;
    for (query, needle) in [
        ("group_by=week", "group_by must be one of"),
        ("format=xml", "format must be json or csv"),
        ("from=2026-03-12&to=2026-03-01", "is after"),
        ("from=yesterday", "from must be a date"),
        ("limit=0", "limit must be"),
        ("colour=blue", "unknown field"),
    ] {
        let (s, e, _) = server
            .call(
                M::GET,
                &format!("/v1/reports/usage?{query}"),
                Some(ADMIN),
                None,
            )
            .await;
        assert_eq!(s, 400, "{query}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(needle),
            "{query}: {e}"
        );
    }
    let (s, _, _) = server.call(M::GET, "/v1/reports/usage", None, None).await;
    assert_eq!(s, 401);
    // No usage yet: an empty report, not an error.
    let (s, v) = server.get("/v1/reports/usage", ADMIN).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["rows"], json!([]));
    assert_eq!(v["totals"]["requests"], 0);
    server.stop().await;
}

#[tokio::test]
async fn reports_over_whole_months_equal_the_sum_of_their_days() {
    // UTC here: months are read from month rollups when the range covers them whole.
    let server = spawn(
        r#"
[tiers.free]
requests_per_minute = "unlimited"
usd_per_day = "unlimited"
usd_per_month = "unlimited"
allowed_models = ["*"]
"#,
    )
    .await;
    const DAY: i64 = 24 * HOUR;
    // 2026-01-31, 2026-02-01, 2026-02-28, 2026-03-01 .. (now is 2026-03-10T12:00Z).
    let feb1 = 1_769_904_000_000_000;
    let plan = [
        (feb1 - DAY, "acme", Some("c1"), "u1", 1_000_000),
        (feb1, "acme", Some("c1"), "u1", 2_000_000),
        (feb1 + 3 * HOUR, "acme", None, "u2", 300_000),
        (feb1 + 27 * DAY, "globex", Some("g1"), "u3", 4_000_000),
        (feb1 + 28 * DAY, "acme", Some("c2"), "u1", 500_000),
        (feb1 + 36 * DAY, "globex", None, "u3", 700_001),
    ];
    let mut recs = Vec::new();
    for (at, tenant, company, user, cost) in plan {
        server.clock.set(at);
        let mut body = json!({
            "tenant_id": tenant, "user_id": user, "model": "gpt-4o",
            "input_tokens": 10, "output_tokens": 5, "cost_usd": micros_text(cost),
        });
        if let Some(c) = company {
            body["company_id"] = json!(c);
        }
        let (s, v) = server.post("/v1/usage", ADMIN, body).await;
        assert_eq!(s, 201, "{v}");
        recs.push((at, tenant, company, user, cost));
    }
    server.clock.set(crate::support::T0);
    for (from, to) in [
        ("2026-02-01", "2026-03-10"),
        ("2026-01-31", "2026-02-28"),
        ("2026-02-01", "2026-02-27"),
        ("2026-01-01", "2026-03-10"),
    ] {
        let day_of = |at: i64| {
            jiff::Timestamp::from_microsecond(at)
                .unwrap()
                .to_zoned_datetime(jiff::tz::TimeZone::UTC)
                .date()
                .to_string()
        };
        let inside: Vec<_> = recs
            .iter()
            .filter(|r| {
                let d = day_of(r.0);
                d.as_str() >= from && d.as_str() <= to
            })
            .collect();
        for (group, cols) in [
            ("tenant", vec!["tenant_id"]),
            ("company", vec!["tenant_id", "company_id"]),
            ("user", vec!["tenant_id", "user_id"]),
            ("day", vec!["day"]),
        ] {
            let (s, v) = server
                .get(
                    &format!("/v1/reports/usage?from={from}&to={to}&group_by={group}"),
                    ADMIN,
                )
                .await;
            assert_eq!(s, 200, "{v}");
            let mut want: BTreeMap<String, i64> = BTreeMap::new();
            for r in &inside {
                let key: Vec<Value> = match group {
                    "tenant" => vec![json!(r.1)],
                    "company" => vec![json!(r.1), opt(r.2)],
                    "user" => vec![json!(r.1), json!(r.3)],
                    _ => vec![json!(day_of(r.0))],
                };
                *want.entry(Value::Array(key).to_string()).or_default() += r.4;
            }
            let got: BTreeMap<String, i64> = got(&v["rows"], &cols)
                .into_iter()
                .map(|(k, s)| (k, s.cost))
                .collect();
            assert_eq!(got, want, "{from}..{to} by {group}");
        }
    }
    server.stop().await;
}
