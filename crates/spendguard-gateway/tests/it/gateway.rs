//! Calls through the gateway, checked at the mock and in the records.

use serde_json::json;
use spendguard_gateway::mock::usage::*;

use crate::support::*;

#[tokio::test]
async fn a_chat_completion_is_charged_exactly_what_the_provider_reported() {
    let h = start("").await;
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock", "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], CHAT_PROMPT);
    let rows = h.records().await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(
        (row.input, row.cached, row.output, row.reasoning),
        (CHAT_PROMPT, CHAT_CACHED, CHAT_COMPLETION, CHAT_REASONING)
    );
    assert_eq!(
        row.cost,
        cost(
            CHAT_PROMPT - CHAT_CACHED,
            CHAT_CACHED,
            CHAT_COMPLETION,
            ("2.50", "1.25", "10.00")
        )
    );
    assert_eq!(row.status, "success");
    assert_eq!(row.upstream.as_deref(), Some("openai-mock"));
    assert_eq!(row.request_id.as_deref(), Some("req_mock_chat"));
    assert_eq!(row.endpoint.as_deref(), Some("openai.chat.completions"));
    h.stop().await;
}

/// The events of an SSE body, as `data:` payloads.
fn data_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_chat_stream_gets_its_usage_asked_for_and_hidden_from_a_caller_that_did_not_ask() {
    let h = start("").await;
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let events = data_lines(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        events.iter().all(|e| !e.contains("\"usage\":{")),
        "a usage chunk reached a caller that did not ask for it: {text}"
    );
    assert!(text.contains("piece 2"));
    let (_, sent) = h.mock.last_request().unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    let rows = h.records().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0].input,
            rows[0].cached,
            rows[0].output,
            rows[0].status.as_str()
        ),
        (CHAT_PROMPT, CHAT_CACHED, CHAT_COMPLETION, "success")
    );
    assert_eq!(
        rows[0].cost,
        cost(
            CHAT_PROMPT - CHAT_CACHED,
            CHAT_CACHED,
            CHAT_COMPLETION,
            ("2.50", "1.25", "10.00")
        )
    );

    // A caller that asked for usage gets the chunk.
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock", "stream": true, "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    let text = r.text().await.unwrap();
    assert_eq!(
        data_lines(&text)
            .iter()
            .filter(|e| e.contains("\"usage\":{"))
            .count(),
        1,
        "{text}"
    );
    assert_eq!(h.records().await.len(), 2);
    h.stop().await;
}

#[tokio::test]
async fn responses_are_charged_from_their_usage_whole_and_streamed() {
    let h = start("").await;
    let expected = cost(
        RESPONSES_INPUT - RESPONSES_CACHED,
        RESPONSES_CACHED,
        RESPONSES_OUTPUT,
        ("2.50", "1.25", "10.00"),
    );
    for stream in [false, true] {
        let r = h
            .post(
                "/openai/v1/responses",
                json!({"model": "gpt-4o-mock", "input": "Say hi", "stream": stream, "max_output_tokens": 500}),
            )
            .await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        if stream {
            assert!(text.contains("event: response.completed"), "{text}");
        }
    }
    let rows = h.records().await;
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert_eq!(
            (row.input, row.cached, row.output),
            (RESPONSES_INPUT, RESPONSES_CACHED, RESPONSES_OUTPUT)
        );
        assert_eq!(row.cost, expected);
        assert_eq!(row.endpoint.as_deref(), Some("openai.responses"));
        assert_eq!(row.request_id.as_deref(), Some("req_mock_responses"));
    }
    h.stop().await;
}

#[tokio::test]
async fn embeddings_are_charged_their_prompt_tokens() {
    let h = start("").await;
    let r = h
        .post(
            "/openai/v1/embeddings",
            json!({"model": "text-embedding-3-mock", "input": ["a", "b"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let rows = h.records().await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].input, rows[0].output), (EMBEDDINGS_PROMPT, 0));
    assert_eq!(
        rows[0].cost,
        cost(EMBEDDINGS_PROMPT, 0, 0, ("0.02", "0.02", "0.02"))
    );
    h.stop().await;
}

#[tokio::test]
async fn anthropic_messages_count_cache_reads_and_writes_on_top_of_input_whole_and_streamed() {
    let h = start("").await;
    // Cache writes are priced as input, reads at the cached price.
    let expected = cost(
        MESSAGES_INPUT + MESSAGES_CACHE_CREATION,
        MESSAGES_CACHE_READ,
        MESSAGES_OUTPUT,
        ("3.00", "0.30", "15.00"),
    );
    for stream in [false, true] {
        let r = h
            .client
            .post(format!("{}/anthropic/v1/messages", h.url))
            .header("x-api-key", &h.key)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({
                "model": "claude-mock", "max_tokens": 1000, "stream": stream,
                "metadata": {"user_id": "alice"},
                "messages": [{"role": "user", "content": "Hi"}]
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["request-id"], "req_mock_messages");
        let text = r.text().await.unwrap();
        if stream {
            assert!(
                text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
                "{text}"
            );
        }
    }
    let (headers, _) = h.mock.last_request().unwrap();
    assert_eq!(headers["x-api-key"], spendguard_gateway::mock::PROVIDER_KEY);
    let rows = h.records().await;
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert_eq!(row.user, "alice");
        assert_eq!(
            (row.input, row.cached, row.output),
            (
                MESSAGES_INPUT + MESSAGES_CACHE_READ + MESSAGES_CACHE_CREATION,
                MESSAGES_CACHE_READ,
                MESSAGES_OUTPUT
            )
        );
        assert_eq!(row.cost, expected);
        assert_eq!(row.upstream.as_deref(), Some("anthropic-mock"));
    }
    h.stop().await;
}

/// Anthropic's cache writes, with their 1-hour part, are kept on the record and charged at the
/// model's 5-minute and 1-hour cache-write prices, whole and streamed.
#[tokio::test]
async fn anthropic_cache_writes_are_charged_at_their_5_minute_and_1_hour_prices() {
    let h = start("").await;
    for stream in [false, true] {
        let r = h
            .client
            .post(format!("{}/anthropic/v1/messages", h.url))
            .header("x-api-key", &h.key)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({
                "model": "claude-mock-cache", "max_tokens": 1000, "stream": stream,
                "metadata": {"user_id": "alice"},
                "messages": [{"role": "user", "content": "Hi"}]
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    // Hand-computed at USD per million: 150 x 3.00 + 2000 x 0.30 + 300 x 3.75 + 200 x 6.00
    // + 89 x 15.00 = 450 + 600 + 1125 + 1200 + 1335 = 4710 micro-dollars.
    assert_eq!(
        (
            MESSAGES_INPUT,
            MESSAGES_CACHE_READ,
            MESSAGES_CACHE_CREATION,
            MESSAGES_CACHE_CREATION_1H,
            MESSAGES_OUTPUT
        ),
        (150, 2_000, 500, 200, 89)
    );
    let rows = h.records().await;
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert_eq!(
            (
                row.input,
                row.cached,
                row.cache_creation,
                row.cache_creation_1h
            ),
            (
                MESSAGES_INPUT + MESSAGES_CACHE_READ + MESSAGES_CACHE_CREATION,
                MESSAGES_CACHE_READ,
                MESSAGES_CACHE_CREATION,
                MESSAGES_CACHE_CREATION_1H
            )
        );
        assert_eq!(row.cost, spendguard_core::Money::from_micros(4_710));
        assert_eq!(row.pricing.as_deref(), Some("config"));
    }
    h.stop().await;
}

#[tokio::test]
async fn count_tokens_is_passed_through_and_charges_nothing() {
    let h = start("").await;
    let r = h
        .client
        .post(format!("{}/anthropic/v1/messages/count_tokens", h.url))
        .header("x-api-key", &h.key)
        .json(&json!({"model": "claude-mock", "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["input_tokens"], COUNT_TOKENS);
    assert!(h.records().await.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn the_provider_key_is_sent_and_the_callers_key_never_is() {
    let h = start("").await;
    let r = h
        .client
        .post(format!("{}/openai/v1/chat/completions", h.url))
        .bearer_auth(&h.key)
        .header("x-spendguard-user", "u1")
        .header("x-custom", "kept here")
        .json(&json!({"model": "gpt-4o-mock", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (headers, _) = h.mock.last_request().unwrap();
    assert_eq!(
        headers["authorization"],
        format!("Bearer {}", spendguard_gateway::mock::PROVIDER_KEY)
    );
    let all = format!("{headers:?}");
    assert!(
        !all.contains(&h.key),
        "the caller's key reached the provider"
    );
    assert!(!all.contains("x-spendguard-user") && !all.contains("x-custom"));
    h.stop().await;
}

#[tokio::test]
async fn errors_come_in_the_providers_shape() {
    let h = start("").await;
    // No key: 401, OpenAI shape.
    let r = h
        .client
        .post(format!("{}/openai/v1/chat/completions", h.url))
        .json(&json!({"model": "gpt-4o-mock", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
    assert!(body["error"]["message"].is_string());
    // A wrong key: 401, Anthropic shape.
    let r = h
        .client
        .post(format!("{}/anthropic/v1/messages", h.url))
        .header("x-api-key", "sg_wrong")
        .json(&json!({"model": "claude-mock", "max_tokens": 5, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");
    // No user and no default: 400.
    let r = h
        .client
        .post(format!("{}/openai/v1/chat/completions", h.url))
        .bearer_auth(&h.key)
        .json(&json!({"model": "gpt-4o-mock", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // A model no upstream serves: 404.
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "mystery-1", "messages": []}),
        )
        .await;
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
    // Not JSON, and a bad max_tokens: 400.
    let r = h
        .client
        .post(format!("{}/openai/v1/chat/completions", h.url))
        .bearer_auth(&h.key)
        .header("x-spendguard-user", "u1")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock", "max_tokens": -1, "messages": []}),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(h.mock.calls(), 0, "nothing refused reaches the provider");
    assert!(h.records().await.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_in_the_providers_shape() {
    let h = start("").await;
    let big = "x".repeat(20 << 20);
    let r = h
        .post(
            "/anthropic/v1/messages",
            json!({"model": "claude-mock", "max_tokens": 5, "messages": [{"role": "user", "content": big}]}),
        )
        .await;
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "request_too_large");
    h.stop().await;
}

#[tokio::test]
async fn a_default_user_is_charged_when_the_request_names_none() {
    let h = start("[gateway]\ndefault_user = \"shared\"\n").await;
    let r = h
        .client
        .post(format!("{}/openai/v1/chat/completions", h.url))
        .bearer_auth(&h.key)
        .json(&json!({"model": "gpt-4o-mock", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The OpenAI `user` field names the user when the header does not.
    let r = h
        .client
        .post(format!("{}/openai/v1/chat/completions", h.url))
        .bearer_auth(&h.key)
        .json(&json!({"model": "gpt-4o-mock", "user": "bob", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let users: Vec<String> = h.records().await.into_iter().map(|r| r.user).collect();
    assert_eq!(users, ["shared", "bob"]);
    h.stop().await;
}

#[tokio::test]
async fn a_denial_is_a_429_with_retry_after_in_either_shape_and_nothing_is_forwarded() {
    // A budget of one cent: the worst case of 4,096 output tokens at $10/M is 4 cents.
    let h = start("[tiers.gw]\nusd_per_day = \"0.01\"\n").await;
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock", "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    // A daily budget resets in hours: the SDKs are told not to retry on their own.
    assert_eq!(r.headers()["x-should-retry"], "false");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    let r = h
        .client
        .post(format!("{}/anthropic/v1/messages", h.url))
        .header("x-api-key", &h.key)
        .header("x-spendguard-user", "u1")
        .json(&json!({"model": "claude-mock", "max_tokens": 4000, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    // A small max_tokens fits.
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.mock.calls(), 1);
    h.stop().await;
}

#[tokio::test]
async fn a_model_the_tier_may_not_use_is_403() {
    let h = start("[tiers.gw]\nallowed_models = [\"claude-*\"]\n").await;
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock", "messages": []}),
        )
        .await;
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_allowed");
    assert_eq!(h.mock.calls(), 0);
    h.stop().await;
}

#[tokio::test]
async fn an_upstream_error_without_usage_releases_the_reservation() {
    let h = start("").await;
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock-error", "messages": []}),
        )
        .await;
    assert_eq!(r.status(), 500);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["message"], "the mock failed");
    assert!(h.records().await.is_empty());
    assert_eq!(h.state.guard.ledger().open_reservations(), 0);
    h.stop().await;
}

#[tokio::test]
async fn a_stream_cut_before_its_usage_is_charged_its_estimate_as_truncated() {
    let h = start("").await;
    for (path, body) in [
        (
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock-cut", "stream": true, "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}),
        ),
        (
            "/anthropic/v1/messages",
            json!({"model": "claude-mock-cut", "stream": true, "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}),
        ),
    ] {
        let r = h.post(path, body).await;
        assert_eq!(r.status(), 200);
        // The caller sees the stream break, as it broke upstream.
        assert!(r.text().await.is_err());
    }
    let rows = h.records().await;
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row.status, "truncated");
        assert!(row.cost.micros() > 0, "a cut stream is never $0");
        assert_eq!(row.output, 100, "the worst case of its output");
    }
    // OpenAI: nothing was known, the input is the gateway's own count; Anthropic told its
    // input in message_start.
    assert_eq!(
        rows[1].input,
        MESSAGES_INPUT + MESSAGES_CACHE_READ + MESSAGES_CACHE_CREATION
    );
    assert_eq!(h.state.guard.ledger().open_reservations(), 0);
    h.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_still_has_its_usage_recorded_once() {
    use futures_util::StreamExt;
    let h = start("").await;
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock-slow", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(body);
    // The gateway reads on to the end of the upstream stream for its usage.
    let rows = h.records().await;
    assert_eq!(h.mock.streams_finished(), 1);
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].input, rows[0].output, rows[0].status.as_str()),
        (CHAT_PROMPT, CHAT_COMPLETION, "success")
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_at_a_budget_of_twenty_worst_cases_forward_at_most_twenty() {
    // gpt-4o-mock-held costs 1 micro-dollar an input token and 2 an output token.
    let body = json!({"model": "gpt-4o-mock-held", "stream": true, "max_tokens": 1000,
                      "messages": [{"role": "user", "content": "Tell me a story"}]});
    let counter = spendguard_gateway::count::Counter::for_model(
        spendguard_core::config::UpstreamKind::Openai,
        "gpt-4o-mock-held",
    );
    let estimate = spendguard_gateway::count::chat_input(counter, &body) + 2 * 1000;
    let budget = 20 * estimate + estimate - 1;
    let h = start(&format!(
        "[tiers.gw]\nusd_per_day = \"{}.{:06}\"\n",
        budget / 1_000_000,
        budget % 1_000_000
    ))
    .await;
    let url = format!("{}/openai/v1/chat/completions", h.url);
    let mut calls = Vec::new();
    for _ in 0..200 {
        let (client, url, key, body) = (h.client.clone(), url.clone(), h.key.clone(), body.clone());
        calls.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .header("x-spendguard-user", "u1")
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            status
        }));
    }
    // Every admitted call waits at the mock until every other one has been decided.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let decided = calls.iter().filter(|c| c.is_finished()).count() as u64;
        if decided + h.mock.in_flight() == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the calls were not decided"
        );
        // Only paces this poll: the loop ends when the condition holds, never because time
        // passed, and every assertion below reads outcomes that are final (a call at the
        // mock was forwarded; a finished call was answered).
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    h.mock.open_gate();
    let mut admitted = 0;
    for c in calls {
        match c.await.unwrap() {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted, 20);
    assert!(
        h.mock.calls() <= 20,
        "{} calls reached the provider",
        h.mock.calls()
    );
    let rows = h.records().await;
    let spent: i64 = rows.iter().map(|r| r.cost.micros()).sum();
    assert!(spent <= budget as i64, "spent {spent} of {budget}");
    assert_eq!(rows.len(), 20);
    h.stop().await;
}

#[tokio::test]
async fn max_tokens_above_the_tiers_maximum_is_400_and_the_models_are_listed() {
    let h = start("").await;
    let r = h
        .post(
            "/anthropic/v1/messages",
            json!({"model": "claude-mock", "max_tokens": 5000, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("4096"),
        "{body}"
    );
    assert_eq!(h.mock.calls(), 0);

    let r = h
        .client
        .get(format!("{}/openai/v1/models", h.url))
        .bearer_auth(&h.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-*", "text-embedding-*"]);
    assert_eq!(body["data"][0]["owned_by"], "openai-mock");
    let r = h
        .client
        .get(format!("{}/openai/v1/models", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    h.stop().await;
}

#[tokio::test]
async fn several_choices_reserve_each_ones_output_and_an_unbounded_output_is_refused() {
    let h = start("[tiers.open]\nusd_per_day = \"100\"\nallowed_models = [\"*\"]\n").await;
    // 50 choices of 100 tokens: 5,000 output tokens, above the tier's 4,096.
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock", "n": 50, "max_tokens": 100, "messages": []}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "max_tokens_too_high", "{body}");
    // Several choices without a bound per choice.
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock", "n": 2, "messages": []}),
        )
        .await;
    assert_eq!(r.status(), 400);
    // A tier without max_output_tokens and a request without max_tokens: no worst case.
    let r = h
        .client
        .post(format!("{}/openai/v1/chat/completions", h.url))
        .bearer_auth(&h.key)
        .header("x-spendguard-user", "u1")
        .header("x-spendguard-tenant", "acme")
        .json(&json!({"model": "gpt-4o-mock", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the gw tier bounds the output");
    h.stop().await;

    let h = start(
        "default_tier = \"open\"\n[tiers.open]\nusd_per_day = \"100\"\nallowed_models = [\"*\"]\n",
    )
    .await;
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock", "messages": []}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_completion_tokens"),
        "{body}"
    );
    assert_eq!(h.mock.calls(), 0);
    assert_eq!(h.state.guard.ledger().open_reservations(), 0);
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock", "max_tokens": 10, "messages": []}),
        )
        .await;
    assert_eq!(r.status(), 200);
    h.stop().await;
}

#[tokio::test]
async fn a_stream_that_hangs_after_its_caller_left_is_charged_its_estimate_when_the_drain_times_out()
 {
    use futures_util::StreamExt;
    let h = start("[gateway]\ndrain_timeout_seconds = 1\n").await;
    let r = h
        .post(
            "/openai/v1/chat/completions",
            json!({"model": "gpt-4o-mock-stall", "stream": true, "max_tokens": 100,
                   "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    assert!(body.next().await.unwrap().unwrap().starts_with(b"data: "));
    drop(body);
    // The upstream never ends: the drain gives up after drain_timeout_seconds and the call
    // is charged its worst case.
    let rows = h.records().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].status.as_str(), rows[0].output),
        ("truncated", 100)
    );
    assert!(rows[0].cost.micros() > 0);
    assert_eq!(h.state.guard.ledger().open_reservations(), 0);
    h.stop().await;
}
