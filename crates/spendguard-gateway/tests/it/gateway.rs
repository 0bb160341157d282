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
        (row.input, row.cached, row.output),
        (CHAT_PROMPT, CHAT_CACHED, CHAT_COMPLETION)
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
