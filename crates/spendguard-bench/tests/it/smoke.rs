//! A few hundred requests against each in-process target.

use std::time::Duration;

use spendguard_bench::gateway::Variant;
use spendguard_bench::{LoadOptions, Mode, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_three_modes_run_and_spendguard_does_not_overspend() {
    let opts = Options {
        mode: Mode::All,
        url: None,
        key: None,
        load: LoadOptions {
            connections: 8,
            duration: Some(Duration::from_secs(10)),
            requests: Some(300),
            users: 200,
            tenants: 4,
            release_ratio: 0.1,
            progress: false,
        },
        history: vec![0, 1000],
        database: None,
        baseline_budget_usd: None,
        verify_sample: 50,
        rounds: 1,
        rate: None,
        cluster: Default::default(),
    };
    let summary = spendguard_bench::run(&opts)
        .await
        .expect("the run completes");
    let targets: Vec<_> = summary.runs.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(
        targets,
        ["ceiling", "spendguard", "baseline", "baseline"],
        "{summary:#?}"
    );
    for r in &summary.runs {
        assert!(r.load.requests >= 300, "{r:#?}");
        assert_eq!(r.load.errors, 0, "{r:#?}");
    }
    let sg = &summary.runs[1];
    let check = sg
        .spendguard_check
        .as_ref()
        .expect("spendguard was checked");
    assert!(
        check.users_checked > 0 && check.entries_checked > 0,
        "{check:#?}"
    );
    assert!(check.overspent.is_empty(), "{check:#?}");
    assert!(!summary.overspent());
    assert!(sg.load.admitted > 0, "{sg:#?}");
    assert_eq!(summary.ratios.len(), 2);
    let text = spendguard_bench::render(&summary);
    assert!(text.contains("sg/base r/s"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_mode_runs_both_paths_and_charges_every_gateway_call() {
    let opts = Options {
        mode: Mode::Gateway,
        url: None,
        key: None,
        load: LoadOptions {
            connections: 4,
            duration: Some(Duration::from_secs(10)),
            requests: Some(100),
            users: 50,
            tenants: 1,
            release_ratio: 0.0,
            progress: false,
        },
        history: vec![],
        database: None,
        baseline_budget_usd: None,
        verify_sample: 0,
        rounds: 2,
        rate: Some(2000.0),
        cluster: Default::default(),
    };
    let summary = spendguard_bench::run(&opts)
        .await
        .expect("the run completes");
    let g = summary.gateway.as_ref().expect("a gateway report");
    // 2 rounds × (whole, streamed) × (direct, gateway).
    assert_eq!(g.runs.len(), 8, "{g:#?}");
    for r in &g.runs {
        assert_eq!((r.requests, r.errors), (100, 0), "{r:#?}");
        assert_eq!(r.ttfb_us.is_some(), r.variant == Variant::Stream, "{r:#?}");
    }
    // The warm-up: 4 calls per connection, per variant and path.
    let warmup = 2 * 4 * 4;
    assert_eq!(g.gateway_calls, 400 + warmup);
    assert_eq!(g.charged_calls, g.gateway_calls, "{g:#?}");
    assert_eq!(g.mock_calls, 800 + 2 * warmup, "{g:#?}");
    assert!(!g.failed());
    assert_eq!(g.overhead.len(), 2);
    let text = spendguard_bench::render(&summary);
    assert!(text.contains("+p50 µs"), "{text}");
}
