//! Hundreds of concurrent reservations over HTTP against a budget that admits a few.

use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reservations_admit_exactly_what_fits() {
    // Each reservation estimates $0.01; the global day admits $0.05: 5 of 240 (no tenant
    // share, so any tenant may take the global budget's last cent).
    let s = spawn(
        "[global]\nusd_per_day = \"0.05\"\n[tenant]\nmax_share_of_global = \"unlimited\"\n[tiers.free]\nrequests_per_minute = \"unlimited\"\nallowed_models = [\"*\"]",
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..240 {
        let client = s.client.clone();
        let url = format!("{}/v1/reservations", s.url);
        tasks.push(tokio::spawn(async move {
            let body = json!({
                "tenant_id": format!("t{}", i % 4),
                "user_id": format!("u{i}"),
                "model": "gpt-4o-mini",
                "input_tokens": 10,
                "max_output_tokens": 10,
                "estimated_cost_usd": "0.01",
            });
            let resp = client
                .post(url)
                .bearer_auth(ADMIN)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let v: serde_json::Value = resp.json().await.unwrap();
            (status, v)
        }));
    }
    let mut admitted = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            (201, v) => admitted.push(v["reservation_id"].as_str().unwrap().to_owned()),
            (429, v) => {
                assert_eq!(error_code(&v), "budget_exceeded");
                refused += 1;
            }
            (st, v) => panic!("unexpected {st}: {v}"),
        }
    }
    assert_eq!(admitted.len(), 5);
    assert_eq!(refused, 235);
    for id in &admitted {
        let (st, _) = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                ADMIN,
                json!({ "input_tokens": 10, "output_tokens": 10, "cost_usd": "0.01" }),
            )
            .await;
        assert_eq!(st, 200);
    }
    let (_, l) = s.get("/v1/limits?tenant_id=t0&user_id=u0", ADMIN).await;
    let global = l["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["scope"] == "global" && x["window"] == "day")
        .unwrap()
        .clone();
    assert_eq!(global["used"], json!(0.05));
    assert_eq!(global["reserved"], json!(0.0));
    s.stop().await;
}
