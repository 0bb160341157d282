//! Prometheus metrics: decisions by outcome and reason, spend, budget utilisation of the
//! global scope and of tenants, request latency by route, writer batches, spool depth and
//! store health. No label ever carries a user id.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use spendguard_core::{Money, ScopeKind};
use spendguard_guard::{Guard, StoreHealth};
use spendguard_store::AnyStore;

use crate::AppState;
use crate::alerts::AlertCounts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    outcome: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    scope: String,
    scope_id: String,
    window: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs to about 1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// The registry and its metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    spend: Counter<f64, AtomicU64>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    spent: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    utilisation: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    batches: Gauge,
    events: Gauge,
    last_batch: Gauge,
    spool_depth: Gauge,
    store_errors: Gauge,
    store_up: Gauge,
    open_reservations: Gauge,
    alerts_raised: Gauge,
    webhooks: Family<OutcomeLabels, Gauge>,
    dead_letters: Total,
    spool_failures: Total,
    sweep_failures: Total,
    ready: Gauge,
}

/// A counter that follows a running total kept elsewhere (the guard's statistics).
#[derive(Debug, Default)]
struct Total {
    counter: Counter,
    seen: AtomicU64,
}

impl Total {
    fn register(registry: &mut Registry, name: &str, help: &str) -> Total {
        let t = Total::default();
        registry.register(name, help, t.counter.clone());
        t
    }

    fn set(&self, total: u64) {
        let before = self
            .seen
            .fetch_max(total, std::sync::atomic::Ordering::Relaxed);
        if total > before {
            self.counter.inc_by(total - before);
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("spendguard");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Reservation decisions by outcome and reason",
            decisions.clone(),
        );
        let spend = Counter::<f64, AtomicU64>::default();
        registry.register(
            "spend_usd",
            "USD committed and recorded since start",
            spend.clone(),
        );
        let latency: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            latency.clone(),
        );
        let spent = Family::<BudgetLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "budget_spent_usd",
            "Spent plus reserved USD in the current window",
            spent.clone(),
        );
        let utilisation = Family::<BudgetLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "budget_utilisation_ratio",
            "Spent plus reserved over the cap, global and per tenant",
            utilisation.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let batches = gauge(
            &mut registry,
            "writer_batches",
            "Store transactions written since start",
        );
        let events = gauge(&mut registry, "writer_events", "Events written since start");
        let last_batch = gauge(
            &mut registry,
            "writer_last_batch_size",
            "Events in the last batch",
        );
        let spool_depth = gauge(&mut registry, "spool_depth", "Batches waiting in the spool");
        let store_errors = gauge(
            &mut registry,
            "store_errors",
            "Failed store writes since start",
        );
        let store_up = gauge(
            &mut registry,
            "store_up",
            "1 when batches reach the store, 0 while spooling",
        );
        let open_reservations = gauge(
            &mut registry,
            "open_reservations",
            "Reservations not settled yet",
        );
        let alerts_raised = gauge(
            &mut registry,
            "alerts_raised",
            "Cost alerts raised (persisted) since start",
        );
        let webhooks = Family::<OutcomeLabels, Gauge>::default();
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts since start, by outcome (delivered, retry, failed)",
            webhooks.clone(),
        );
        let dead_letters = Total::register(
            &mut registry,
            "dead_letters",
            "Events the store refused for good, kept as dead letters, since start",
        );
        let spool_failures = Total::register(
            &mut registry,
            "spool_failures",
            "Failed spool appends or reads since start",
        );
        let sweep_failures = Total::register(
            &mut registry,
            "sweep_failures",
            "Failed expiry sweeps since start (each is retried at the next tick)",
        );
        let ready = gauge(
            &mut registry,
            "ready",
            "1 when /readyz answers 200: the writer, the spool and the sweeper work",
        );
        Metrics {
            dead_letters,
            spool_failures,
            sweep_failures,
            ready,
            alerts_raised,
            webhooks,
            registry,
            decisions,
            spend,
            latency,
            spent,
            utilisation,
            batches,
            events,
            last_batch,
            spool_depth,
            store_errors,
            store_up,
            open_reservations,
        }
    }

    pub fn decision(&self, outcome: &str, reason: &str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                outcome: outcome.into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn spend(&self, usd: Money) {
        self.spend.inc_by(usd.as_usd_f64());
    }

    /// The text exposition, with the gauges read at this moment.
    pub fn render(&self, guard: &Guard<AnyStore>, alerts: &AlertCounts) -> String {
        let to_i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let load = |c: &std::sync::atomic::AtomicU64| to_i(c.load(Ordering::Relaxed));
        self.alerts_raised.set(load(&alerts.raised));
        for (outcome, c) in [
            ("delivered", &alerts.delivered),
            ("retry", &alerts.retried),
            ("failed", &alerts.failed),
        ] {
            self.webhooks
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.into(),
                })
                .set(load(c));
        }
        let stats = guard.stats();
        self.batches.set(to_i(stats.batches));
        self.events.set(to_i(stats.events));
        self.last_batch.set(to_i(stats.last_batch_size));
        self.spool_depth.set(to_i(stats.spool_depth));
        self.store_errors.set(to_i(stats.store_errors));
        self.store_up
            .set(i64::from(stats.health == StoreHealth::Ok));
        self.dead_letters.set(stats.dead_letters);
        self.spool_failures.set(stats.spool_failures);
        self.sweep_failures.set(stats.sweep_failures);
        self.ready.set(i64::from(guard.ready()));
        self.open_reservations
            .set(to_i(guard.ledger().open_reservations() as u64));
        let now = guard.now();
        let ledger = guard.ledger();
        for kind in [ScopeKind::Global, ScopeKind::Tenant] {
            for (scope, day, month) in ledger.totals(kind, now) {
                let budget = ledger.budget_of(&scope);
                for (window, (spent, reserved), cap) in
                    [("day", day, budget.daily), ("month", month, budget.monthly)]
                {
                    let labels = BudgetLabels {
                        scope: kind.as_str().into(),
                        scope_id: scope.id().into(),
                        window: window.into(),
                    };
                    let used = spent.saturating_add(reserved);
                    self.spent.get_or_create(&labels).set(used.as_usd_f64());
                    if let Some(cap) = cap.filter(|c| *c > Money::ZERO) {
                        self.utilisation
                            .get_or_create(&labels)
                            .set(used.as_usd_f64() / cap.as_usd_f64());
                    }
                }
            }
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Records each request's latency under its route template (never the raw path).
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    state
        .metrics
        .latency
        .get_or_create(&RouteLabels {
            method,
            route,
            status: response.status().as_u16().to_string(),
        })
        .observe(started.elapsed().as_secs_f64());
    response
}
