//! The configured limits: connections (count, header and idle timeouts), the metrics key
//! and the open metrics listener, report pages.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Reads until the server closes the connection; panics if it is still open after 20 s.
async fn closed_by_server(stream: &mut TcpStream) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => panic!("the server kept the connection open for 20 s"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {} // a response; read on until the close
        }
    }
}

/// Sends one complete keep-alive request and reads its whole (small) answer.
async fn request(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: spendguard\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("\"ok\"}") {
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
            .await
            .expect("an answer within 20 s")
            .unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

#[tokio::test]
async fn slow_headers_are_closed_by_the_header_timeout() {
    // The idle timeout is far away: only the header timeout can close these.
    let s = spawn("[http]\nheader_timeout_seconds = 1\nidle_timeout_seconds = 600\n").await;
    let addr = s.url.trim_start_matches("http://").to_owned();
    // A request's head, never finished.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    closed_by_server(&mut slow).await;
    // The same after a first request on a keep-alive connection.
    let mut second = TcpStream::connect(&addr).await.unwrap();
    assert!(request(&mut second).await.starts_with("HTTP/1.1 200"));
    second
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    closed_by_server(&mut second).await;
    s.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_by_the_idle_timeout() {
    let s = spawn("[http]\nheader_timeout_seconds = 600\nidle_timeout_seconds = 1\n").await;
    let addr = s.url.trim_start_matches("http://").to_owned();
    // A keep-alive connection that served a request, then stays idle.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    assert!(request(&mut idle).await.starts_with("HTTP/1.1 200"));
    closed_by_server(&mut idle).await;
    // A connection that says nothing at all.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    closed_by_server(&mut silent).await;
    s.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let s = spawn(
        "[http]\nmax_connections = 3\nidle_timeout_seconds = 600\nheader_timeout_seconds = 600\n",
    )
    .await;
    let addr = s.url.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        assert!(request(&mut c).await.starts_with("HTTP/1.1 200"));
        held.push(c);
    }
    let mut extra = TcpStream::connect(&addr).await.unwrap();
    closed_by_server(&mut extra).await;
    let text = s
        .state
        .metrics
        .render(&s.state.guard, s.state.alerts.counts());
    assert!(
        text.contains("spendguard_http_connections_refused_total 1"),
        "{text}"
    );
    assert!(text.contains("spendguard_http_connections 3"), "{text}");
    // The held ones still work; once one closes, a new connection is served.
    assert!(request(&mut held[0]).await.starts_with("HTTP/1.1 200"));
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        if c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .is_ok()
        {
            let mut buf = [0u8; 64];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await
                && n > 0
            {
                assert!(buf.starts_with(b"HTTP/1.1 200"));
                break;
            }
        }
        assert!(Instant::now() < deadline, "no slot came free in 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    s.stop().await;
}

#[tokio::test]
async fn the_metrics_key_reads_metrics_only_and_the_open_listener_needs_none() {
    let s = spawn("").await;
    let resp = s
        .client
        .get(format!("{}/metrics", s.url))
        .bearer_auth(METRICS_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (st, _) = s.get("/v1/alerts", METRICS_KEY).await;
    assert_eq!(st, 401);
    // The open listener (loopback only, by configuration) serves /metrics without a key.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(spendguard_server::run_metrics(
        listener,
        s.state.clone(),
        async move {
            let _ = rx.await;
        },
    ));
    let resp = s.client.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("spendguard_open_reservations")
    );
    let resp = s
        .client
        .get(format!("{url}/v1/alerts"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    s.stop().await;
}

#[tokio::test]
async fn reports_come_in_pages_by_default() {
    let s =
        spawn("[reports]\ndefault_limit = 2\n[tiers.free]\nrequests_per_minute = \"unlimited\"\n")
            .await;
    for (i, cost) in ["0.05", "0.04", "0.03", "0.02", "0.01"].iter().enumerate() {
        let (st, v) = s
            .post(
                "/v1/usage",
                ADMIN,
                json!({
                    "tenant_id": "acme", "user_id": format!("u{i}"), "model": "gpt-4o-mini",
                    "input_tokens": 1, "output_tokens": 1, "cost_usd": cost,
                }),
            )
            .await;
        assert_eq!(st, 201, "{v}");
    }
    let mut users = Vec::new();
    let mut path = "/v1/reports/usage?group_by=user".to_owned();
    let mut pages = 0;
    loop {
        let (st, v) = s.get(&path, ADMIN).await;
        assert_eq!(st, 200, "{v}");
        pages += 1;
        let rows = v["rows"].as_array().unwrap();
        assert!(rows.len() <= 2, "{v}");
        assert_eq!(v["groups"], 5);
        users.extend(
            rows.iter()
                .map(|r| r["user_id"].as_str().unwrap().to_owned()),
        );
        match v["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/reports/usage?group_by=user&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(users, ["u0", "u1", "u2", "u3", "u4"]);
    // An explicit limit still applies; a cursor that is not one is refused.
    let (_, v) = s
        .get("/v1/reports/usage?group_by=user&limit=5", ADMIN)
        .await;
    assert_eq!(v["rows"].as_array().unwrap().len(), 5);
    assert_eq!(v["next_cursor"], serde_json::Value::Null);
    let (st, e) = s.get("/v1/reports/usage?cursor=-1", ADMIN).await;
    assert_eq!((st, error_code(&e)), (400, "invalid_request"));
    s.stop().await;
}
