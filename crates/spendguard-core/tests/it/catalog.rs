//! The price catalog: real models' published prices, charged to the micro-dollar; the
//! conversion from the vendored LiteLLM snapshot, reproduced byte for byte; and the order of
//! price sources (tenant override > config > catalog).

use std::path::Path;
use std::process::Command;

use spendguard_core::prices::{Source, TenantPrices};
use spendguard_core::*;

use crate::support::*;

/// A model's published standard prices, in USD per million tokens, as its provider lists
/// them. `None`: the provider publishes no such price (cache reads and writes are then
/// charged as input, 1-hour writes as 5-minute ones).
struct Published {
    model: &'static str,
    input: &'static str,
    cached: Option<&'static str>,
    write_5m: Option<&'static str>,
    write_1h: Option<&'static str>,
    output: &'static str,
    long: Option<LongTier>,
}

/// Prompts above `.0` tokens: input, cached, 5-minute write, 1-hour write, output.
type LongTier = (
    u64,
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    &'static str,
);

const fn p(
    model: &'static str,
    input: &'static str,
    cached: Option<&'static str>,
    output: &'static str,
) -> Published {
    Published {
        model,
        input,
        cached,
        write_5m: None,
        write_1h: None,
        output,
        long: None,
    }
}

const fn anthropic(
    model: &'static str,
    input: &'static str,
    cached: &'static str,
    write_5m: &'static str,
    write_1h: &'static str,
    output: &'static str,
) -> Published {
    Published {
        model,
        input,
        cached: Some(cached),
        write_5m: Some(write_5m),
        write_1h: Some(write_1h),
        output,
        long: None,
    }
}

#[rustfmt::skip]
const PUBLISHED: &[Published] = &[
    // OpenAI
    p("gpt-4o", "2.50", Some("1.25"), "10.00"),
    p("gpt-4o-2024-08-06", "2.50", Some("1.25"), "10.00"),
    p("gpt-4o-mini", "0.15", Some("0.075"), "0.60"),
    p("gpt-4.1", "2.00", Some("0.50"), "8.00"),
    p("gpt-4.1-mini", "0.40", Some("0.10"), "1.60"),
    p("gpt-4.1-nano", "0.10", Some("0.025"), "0.40"),
    p("o1", "15.00", Some("7.50"), "60.00"),
    p("o3", "2.00", Some("0.50"), "8.00"),
    p("o4-mini", "1.10", Some("0.275"), "4.40"),
    p("gpt-5", "1.25", Some("0.125"), "10.00"),
    p("gpt-5-mini", "0.25", Some("0.025"), "2.00"),
    p("gpt-5-nano", "0.05", Some("0.005"), "0.40"),
    p("gpt-5.1", "1.25", Some("0.125"), "10.00"),
    p("gpt-5.2", "1.75", Some("0.175"), "14.00"),
    Published { long: Some((272_000, "5.00", "0.50", None, None, "22.50")),
        ..p("gpt-5.4", "2.50", Some("0.25"), "15.00") },
    p("text-embedding-3-small", "0.02", None, "0"),
    // Anthropic
    anthropic("claude-sonnet-4-5", "3.00", "0.30", "3.75", "6.00", "15.00"),
    anthropic("claude-sonnet-4-6", "3.00", "0.30", "3.75", "6.00", "15.00"),
    anthropic("claude-haiku-4-5", "1.00", "0.10", "1.25", "2.00", "5.00"),
    anthropic("claude-opus-4-5", "5.00", "0.50", "6.25", "10.00", "25.00"),
    anthropic("claude-opus-4-6", "5.00", "0.50", "6.25", "10.00", "25.00"),
    // Google (Gemini API and Vertex AI)
    Published { long: Some((200_000, "2.50", "0.25", None, None, "15.00")),
        ..p("gemini/gemini-2.5-pro", "1.25", Some("0.125"), "10.00") },
    Published { long: Some((200_000, "4.00", "0.40", None, None, "18.00")),
        ..p("gemini/gemini-3.1-pro-preview", "2.00", Some("0.20"), "12.00") },
    p("gemini/gemini-2.5-flash", "0.30", Some("0.03"), "2.50"),
    p("gemini/gemini-2.5-flash-lite", "0.10", Some("0.01"), "0.40"),
    p("gemini-3-flash-preview", "0.50", Some("0.05"), "3.00"),
    // Mistral
    p("mistral-large-latest", "0.50", Some("0.05"), "1.50"),
    p("mistral-medium-latest", "1.50", Some("0.15"), "7.50"),
    p("mistral-small-latest", "0.15", Some("0.015"), "0.60"),
    p("codestral-latest", "0.30", Some("0.03"), "0.90"),
    // DeepSeek
    p("deepseek-chat", "0.28", Some("0.028"), "0.42"),
    p("deepseek-reasoner", "0.28", Some("0.028"), "0.42"),
    // xAI
    Published { long: Some((200_000, "2.50", "0.40", None, None, "5.00")),
        ..p("xai/grok-4.20", "1.25", Some("0.20"), "2.50") },
    Published { long: Some((200_000, "2.00", "0.40", None, None, "4.00")),
        ..p("xai/grok-code-fast-1", "1.00", Some("0.20"), "2.00") },
    // Meta (hosted), Amazon Bedrock and Vertex AI names
    p("meta/muse-spark-1.3", "1.25", Some("0.15"), "4.25"),
    p("meta.llama3-70b-instruct-v1:0", "2.65", None, "3.50"),
    p("vertex_ai/meta/llama-4-maverick-17b-128e-instruct-maas", "0.35", None, "1.15"),
    p("amazon.nova-pro-v1:0", "0.80", Some("0.20"), "3.20"),
    p("amazon.nova-lite-v1:0", "0.06", Some("0.015"), "0.24"),
    Published { long: Some((200_000, "6.00", "0.60", Some("7.50"), Some("12.00"), "22.50")),
        ..anthropic("anthropic.claude-sonnet-4-5-20250929-v1:0", "3.00", "0.30", "3.75", "6.00", "15.00") },
    Published { long: Some((200_000, "6.00", "0.60", Some("7.50"), Some("12.00"), "22.50")),
        ..anthropic("vertex_ai/claude-sonnet-4-5@20250929", "3.00", "0.30", "3.75", "6.00", "15.00") },
    p("vertex_ai/mistral-large-2411", "2.00", None, "6.00"),
    p("vertex_ai/deepseek-ai/deepseek-v3.1-maas", "0.60", Some("0.06"), "1.70"),
];

/// A decimal USD-per-million price as pico-USD per token (millionths of that price), parsed
/// here by hand so the expected figures owe nothing to the code under test.
fn picos(s: &str) -> i128 {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    assert!(frac.len() <= 6, "{s}");
    let frac = format!("{frac:0<6}");
    whole.parse::<i128>().unwrap() * 1_000_000 + frac.parse::<i128>().unwrap()
}

/// The hand-computed cost in micro-dollars of `t` at published prices `m`.
fn expected(m: &Published, t: Tokens) -> i64 {
    let long = m.long.filter(|l| t.input > l.0);
    let (input, cached, w5, w1, output) = match long {
        Some((_, i, c, w5, w1, o)) => (
            picos(i),
            picos(c),
            picos(w5.or(m.write_5m).unwrap_or(i)),
            picos(w1.or(m.write_1h).or(w5).or(m.write_5m).unwrap_or(i)),
            picos(o),
        ),
        None => (
            picos(m.input),
            picos(m.cached.unwrap_or(m.input)),
            picos(m.write_5m.unwrap_or(m.input)),
            picos(m.write_1h.or(m.write_5m).unwrap_or(m.input)),
            picos(m.output),
        ),
    };
    let plain = (t.input - t.cached_input - t.cache_creation) as i128;
    let w5_tokens = (t.cache_creation - t.cache_creation_1h) as i128;
    // Reasoning tokens are output tokens: none of these models prices them apart.
    let total = plain * input
        + t.cached_input as i128 * cached
        + w5_tokens * w5
        + t.cache_creation_1h as i128 * w1
        + t.output as i128 * output;
    // Rounded up to the micro-dollar, once.
    ((total + 999_999) / 1_000_000) as i64
}

/// The token mixes each model is charged for.
fn mixes() -> Vec<(&'static str, Tokens)> {
    vec![
        ("plain", Tokens::new(1_234, 567)),
        (
            "cached",
            Tokens {
                cached_input: 4_000,
                ..Tokens::new(10_000, 1_001)
            },
        ),
        (
            "cache write 5m",
            Tokens {
                cache_creation: 8_000,
                ..Tokens::new(20_003, 300)
            },
        ),
        (
            "cache write 1h",
            Tokens {
                cached_input: 2_000,
                cache_creation: 8_000,
                cache_creation_1h: 5_000,
                ..Tokens::new(20_000, 333)
            },
        ),
        (
            "reasoning",
            Tokens {
                reasoning: 1_500,
                ..Tokens::new(3_000, 2_007)
            },
        ),
        (
            "above 200k input",
            Tokens {
                cached_input: 50_000,
                cache_creation: 10_000,
                cache_creation_1h: 4_000,
                ..Tokens::new(300_001, 4_321)
            },
        ),
        ("one token", Tokens::new(1, 1)),
    ]
}

#[test]
fn published_prices_of_real_models_are_charged_to_the_micro_dollar() {
    assert!(PUBLISHED.len() >= 30, "{}", PUBLISHED.len());
    let ledger = Ledger::new(Policy::builtin());
    let mut n = 0;
    for m in PUBLISHED {
        for (what, tokens) in mixes() {
            n += 1;
            let mut s = subject("t", "u", None);
            s.model = ModelName::parse(m.model).unwrap();
            let req = RecordRequest {
                id: id(n),
                subject: s,
                tokens,
                cost: None,
                status: RequestStatus::Success,
                idempotency_key: None,
            };
            let usage = ledger.record(&req, T0).unwrap().value;
            assert_eq!(
                usage.cost.micros(),
                expected(m, tokens),
                "{} ({what}): {tokens:?}",
                m.model
            );
            assert_eq!(usage.pricing, Pricing::Catalog, "{}", m.model);
            assert_eq!(usage.tokens, tokens);
            let tier = m.long.map(|l| l.0).filter(|&above| tokens.input > above);
            assert_eq!(usage.long_context_above, tier, "{} ({what})", m.model);
        }
    }
}

#[test]
fn catalog_is_the_conversion_of_the_vendored_snapshot() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("../../scripts/convert-prices.py");
    let snapshot = root.join("data/litellm/model_prices.json");
    // No python3 is a failure, not a skip: the catalog must stay reproducible.
    let out = Command::new("python3")
        .arg(&script)
        .arg("convert")
        .arg(&snapshot)
        .output()
        .expect("python3 runs (it is needed to check the price catalog)");
    assert!(
        out.status.success(),
        "convert-prices.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = std::fs::read(root.join("data/catalog.tsv")).unwrap();
    assert!(
        out.stdout == committed,
        "data/catalog.tsv is not the conversion of data/litellm/model_prices.json; \
         regenerate it with scripts/convert-prices.py convert"
    );
    assert_eq!(committed, prices::CATALOG_TSV.as_bytes());
}

#[test]
fn a_config_price_beats_the_catalog_and_a_tenant_override_beats_both() {
    let policy = policy(
        r#"
[prices."claude-sonnet-4-5"]
input = "2"
cached_input = "0.2"
cache_write = "2.5"
output = "10"
[prices."house-model"]
input = "1"
output = "3"
"#,
    );
    let ledger = Ledger::new(policy);
    let tokens = Tokens {
        cached_input: 100_000,
        cache_creation: 100_000,
        ..Tokens::new(1_000_000, 1_000_000)
    };
    let record = |n: u64, tenant: &str, model: &str| {
        let mut s = subject(tenant, "u", None);
        s.model = ModelName::parse(model).unwrap();
        let req = RecordRequest {
            id: id(n),
            subject: s,
            tokens,
            cost: None,
            status: RequestStatus::Success,
            idempotency_key: None,
        };
        ledger.record(&req, T0).unwrap().value
    };
    // Catalog: 800k x 1 + 100k x 0.10 + 100k x 1.25 + 1M x 5 = 0.8 + 0.01 + 0.125 + 5.
    let u = record(1, "a", "claude-haiku-4-5");
    assert_eq!((u.pricing, u.cost), (Pricing::Catalog, usd("5.935")));
    // The configured price beats the catalog's, for the dated name too.
    let u = record(2, "a", "claude-sonnet-4-5-20250929");
    assert_eq!(u.pricing, Pricing::Config);
    // 800k x 2 + 100k x 0.2 + 100k x 2.5 + 1M x 10 = 1.6 + 0.02 + 0.25 + 10.
    assert_eq!(u.cost, usd("11.87"));

    // Tenant `b`: its own price for the model, and 50% of every other.
    let own = Price::simple(usd("1"), usd("1"));
    ledger
        .set_tenant_prices(
            TenantId::parse("b").unwrap(),
            TenantPrices {
                multiplier_ppm: Some(500_000),
                models: [("claude-sonnet-4-5".to_owned(), own)].into(),
            },
        )
        .unwrap();
    let u = record(3, "b", "claude-sonnet-4-5");
    assert_eq!((u.pricing, u.cost), (Pricing::TenantOverride, usd("2")));
    let u = record(4, "b", "claude-sonnet-4-5-20250929");
    assert_eq!((u.pricing, u.cost), (Pricing::TenantOverride, usd("2")));
    // A configured price scaled: half of (1M x 1 + 1M x 3).
    assert_eq!(record(8, "a", "house-model").cost, usd("4"));
    let u = record(9, "b", "house-model");
    assert_eq!((u.pricing, u.cost), (Pricing::TenantOverride, usd("2")));
    // A catalog price scaled: half of 5.935, rounded up once.
    let u = record(10, "b", "claude-haiku-4-5");
    assert_eq!(
        (u.pricing, u.cost),
        (Pricing::TenantOverride, usd("2.9675"))
    );
    let u = record(5, "b", "gpt-4o");
    // Half of 800k x 2.50 + 100k x 1.25 + 100k x 2.50 (no cache-write price: input) + 1M x 10
    // = half of 12.375.
    assert_eq!(
        (u.pricing, u.cost),
        (Pricing::TenantOverride, usd("6.1875"))
    );
    // Tenant `a` is unaffected.
    assert_eq!(record(6, "a", "claude-sonnet-4-5").pricing, Pricing::Config);
    let q = ledger
        .policy()
        .prices
        .quote(
            "claude-sonnet-4-5",
            ledger
                .tenant_prices(&TenantId::parse("b").unwrap())
                .as_deref(),
        )
        .unwrap();
    assert_eq!(q.source, Source::TenantOverride);
    // Cleared, the configured price is back.
    ledger
        .set_tenant_prices(TenantId::parse("b").unwrap(), TenantPrices::default())
        .unwrap();
    assert_eq!(record(7, "b", "claude-sonnet-4-5").pricing, Pricing::Config);
}

#[test]
fn a_keyed_record_retried_with_other_token_kinds_is_a_conflict() {
    let ledger = Ledger::new(Policy::builtin());
    let key = IdempotencyKey::parse("k-1").unwrap();
    let req = |reasoning: u64| RecordRequest {
        id: id(reasoning + 1),
        subject: subject("t", "u", None),
        tokens: Tokens {
            reasoning,
            ..Tokens::new(1_000, 500)
        },
        cost: None,
        status: RequestStatus::Success,
        idempotency_key: Some(key.clone()),
    };
    let first = ledger.record(&req(100), T0).unwrap().value;
    // The same request again: the same record.
    assert_eq!(ledger.record(&req(100), T0).unwrap().value, first);
    assert!(matches!(
        ledger.record(&req(200), T0),
        Err(LedgerError::IdempotencyConflict(_))
    ));
}

/// Journal and spool rows written before the token kinds existed still decode: the new
/// fields default to zero and none, and records without them are written as before.
#[test]
fn records_and_events_without_the_token_kinds_still_decode() {
    let old = r#"{"input":1000,"cached_input":200,"output":50}"#;
    let t: Tokens = serde_json::from_str(old).unwrap();
    assert_eq!(
        t,
        Tokens {
            cached_input: 200,
            ..Tokens::new(1000, 50)
        }
    );
    assert_eq!(serde_json::to_string(&t).unwrap(), old);

    let ledger = Ledger::new(Policy::builtin());
    let req = RecordRequest {
        id: id(1),
        subject: subject("t", "u", None),
        tokens: t,
        cost: None,
        status: RequestStatus::Success,
        idempotency_key: None,
    };
    let event = ledger.record(&req, T0).unwrap().event.unwrap();
    let mut json = serde_json::to_value(&event).unwrap();
    let usage = json.get_mut("Recorded").unwrap().as_object_mut().unwrap();
    assert!(!usage.contains_key("long_context_above"));
    // As an older version wrote it: no pricing either.
    usage.remove("pricing");
    let decoded: Event = serde_json::from_value(json).unwrap();
    match decoded {
        Event::Recorded(u) => {
            assert_eq!((u.tokens, u.long_context_above), (t, None));
            assert_eq!(u.pricing, Pricing::Catalog);
        }
        other => panic!("{other:?}"),
    }
}
