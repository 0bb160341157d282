//! Prometheus metrics: decisions by outcome and reason, spend, budget utilisation of the
//! global scope and of tenants, request latency by route, writer batches, spool depth and
//! store health. No label ever carries a user id.
//!
//! Every label has a bounded set of values: `method` is one of the standard methods or
//! `other`, `route` a route template or `unmatched`, `status` a status code the server
//! sends, `outcome` and `reason` fixed codes, `scope_id` the global scope or a tenant id
//! (tenants exist only through keys the admin creates). Money is exposed as integer
//! micro-USD, so sums are exact; things counted since start are counters.

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
    spend: Counter,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    spent: Family<BudgetLabels, Gauge>,
    utilisation: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    batches: Counter,
    events: Counter,
    last_batch: Gauge,
    spool_depth: Gauge,
    store_errors: Counter,
    store_up: Gauge,
    open_reservations: Gauge,
    alerts_raised: Counter,
    webhooks: Family<OutcomeLabels, Counter>,
    would_deny: Family<ReasonLabels, Counter>,
    dead_letters: Counter,
    spool_failures: Counter,
    sweep_failures: Counter,
    ready: Gauge,
    /// Cluster mode (absent from the exposition on one node): batches, operations,
    /// retries, failures, configuration reloads, and the heartbeat's state.
    cluster: Option<ClusterMetrics>,
    connections: Gauge,
    connections_refused: Counter,
    /// Renders one at a time: counters read from elsewhere advance by their difference.
    rendering: std::sync::Mutex<()>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn gauge(registry: &mut Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::default();
    registry.register(name, help, g.clone());
    g
}

fn counter(registry: &mut Registry, name: &str, help: &str) -> Counter {
    let c = Counter::default();
    registry.register(name, help, c.clone());
    c
}

/// The metrics of cluster mode.
#[derive(Debug)]
struct ClusterMetrics {
    batches: Counter,
    operations: Counter,
    retries: Counter,
    failures: Counter,
    config_reloads: Counter,
    heartbeat_up: Gauge,
    allowance_top_ups: Counter,
    allowance_returns: Counter,
    allowance_reclaims: Counter,
    allowance_denials: Counter,
    false_denials: Counter,
    live_instances: Gauge,
}

impl Metrics {
    /// [`Metrics::new`] with the metrics of cluster mode.
    pub fn for_cluster() -> Metrics {
        let mut m = Metrics::new();
        let registry = &mut m.registry;
        let batches = counter(
            registry,
            "cluster_batches",
            "Batches of decisions this instance committed on the shared rows",
        );
        let operations = counter(
            registry,
            "cluster_operations",
            "Operations (reserve, commit, release, record, expire) decided in them",
        );
        let retries = counter(
            registry,
            "cluster_retries",
            "Batches run again after a deadlock or a serialization failure",
        );
        let failures = counter(
            registry,
            "cluster_failures",
            "Batches whose transaction failed (their callers got an error)",
        );
        let config_reloads = counter(
            registry,
            "cluster_config_reloads",
            "Reloads of budgets, users and prices changed through another instance",
        );
        let heartbeat_up = gauge(
            registry,
            "cluster_heartbeat_up",
            "1 while this instance's heartbeat reaches the database",
        );
        let allowance_top_ups = counter(
            registry,
            "cluster_allowance_top_ups",
            "Batches that moved capacity from a busy scope's budget to this instance",
        );
        let allowance_returns = counter(
            registry,
            "cluster_allowance_returns",
            "Heartbeats that folded this instance's allowances into the shared rows and gave \
             back what it did not need",
        );
        let allowance_reclaims = counter(
            registry,
            "cluster_allowance_reclaims",
            "Allowances of lapsed instances this instance took back",
        );
        let allowance_denials = counter(
            registry,
            "cluster_allowance_denials",
            "Reservations refused by a budget decided through an allowance (at most these \
             were false denials)",
        );
        let false_denials = counter(
            registry,
            "cluster_false_denials",
            "Of those, refusals while the cluster had the capacity free, idle in another \
             live instance's allowance",
        );
        let live_instances = gauge(
            registry,
            "cluster_live_instances",
            "Live instances of the cluster, as of this instance's last heartbeat",
        );
        m.cluster = Some(ClusterMetrics {
            allowance_top_ups,
            allowance_returns,
            allowance_reclaims,
            allowance_denials,
            false_denials,
            live_instances,
            batches,
            operations,
            retries,
            failures,
            config_reloads,
            heartbeat_up,
        });
        m
    }

    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("spendguard");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Reservation decisions by outcome and reason",
            decisions.clone(),
        );
        let spend = Counter::default();
        registry.register(
            "spend_micro_usd",
            "Micro-USD (millionths of a dollar) committed and recorded since start",
            spend.clone(),
        );
        let latency: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            latency.clone(),
        );
        let spent = Family::<BudgetLabels, Gauge>::default();
        registry.register(
            "budget_spent_micro_usd",
            "Spent plus reserved micro-USD in the current window",
            spent.clone(),
        );
        let utilisation = Family::<BudgetLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "budget_utilisation_ratio",
            "Spent plus reserved over the cap, global and per tenant",
            utilisation.clone(),
        );
        let batches = counter(
            &mut registry,
            "writer_batches",
            "Store transactions written since start",
        );
        let events = counter(&mut registry, "writer_events", "Events written since start");
        let last_batch = gauge(
            &mut registry,
            "writer_last_batch_size",
            "Events in the last batch",
        );
        let spool_depth = gauge(&mut registry, "spool_depth", "Batches waiting in the spool");
        let store_errors = counter(
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
        let alerts_raised = counter(
            &mut registry,
            "alerts_raised",
            "Cost alerts raised (persisted) since start",
        );
        let webhooks = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts since start, by outcome (delivered, retry, failed)",
            webhooks.clone(),
        );
        let would_deny = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "would_deny",
            "Reservations admitted that a limit in shadow would have refused, since start, \
             by the reason it would have given (budget_exceeded, rate_limited, ...)",
            would_deny.clone(),
        );
        let dead_letters = counter(
            &mut registry,
            "dead_letters",
            "Events the store refused for good, kept as dead letters, since start",
        );
        let spool_failures = counter(
            &mut registry,
            "spool_failures",
            "Failed spool appends or reads since start",
        );
        let sweep_failures = counter(
            &mut registry,
            "sweep_failures",
            "Failed expiry sweeps since start (each is retried at the next tick)",
        );
        let ready = gauge(
            &mut registry,
            "ready",
            "1 when /readyz answers 200: the writer, the spool and the sweeper work",
        );
        let connections = gauge(&mut registry, "http_connections", "Open HTTP connections");
        let connections_refused = counter(
            &mut registry,
            "http_connections_refused",
            "Connections closed at once because the connection limit was reached",
        );
        Metrics {
            dead_letters,
            spool_failures,
            sweep_failures,
            ready,
            cluster: None,
            alerts_raised,
            webhooks,
            would_deny,
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
            connections,
            connections_refused,
            rendering: std::sync::Mutex::new(()),
        }
    }

    /// A connection opened (`true`) or closed.
    pub fn connection(&self, open: bool) {
        if open {
            self.connections.inc();
        } else {
            self.connections.dec();
        }
    }

    /// A connection refused at the connection limit.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
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
        self.spend.inc_by(u64::try_from(usd.micros()).unwrap_or(0));
    }

    /// The text exposition, with the gauges read at this moment.
    pub fn render(&self, guard: &Guard<AnyStore>, alerts: &AlertCounts) -> String {
        let _one = self.rendering.lock().unwrap_or_else(|e| e.into_inner());
        let to_i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        // A counter kept elsewhere: advance ours to its value.
        let advance = |c: &Counter, to: u64| {
            let at = c.get();
            if to > at {
                c.inc_by(to - at);
            }
        };
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        advance(&self.alerts_raised, load(&alerts.raised));
        for (outcome, c) in [
            ("delivered", &alerts.delivered),
            ("retry", &alerts.retried),
            ("failed", &alerts.failed),
        ] {
            advance(
                &self.webhooks.get_or_create(&OutcomeLabels {
                    outcome: outcome.into(),
                }),
                load(c),
            );
        }
        for (reason, n) in guard.would_deny_counts() {
            advance(
                &self.would_deny.get_or_create(&ReasonLabels {
                    reason: reason.into(),
                }),
                n,
            );
        }
        let stats = guard.stats();
        advance(&self.batches, stats.batches);
        advance(&self.events, stats.events);
        self.last_batch.set(to_i(stats.last_batch_size));
        self.spool_depth.set(to_i(stats.spool_depth));
        advance(&self.store_errors, stats.store_errors);
        self.store_up
            .set(i64::from(stats.health == StoreHealth::Ok));
        advance(&self.dead_letters, stats.dead_letters);
        advance(&self.spool_failures, stats.spool_failures);
        advance(&self.sweep_failures, stats.sweep_failures);
        self.ready.set(i64::from(guard.ready()));
        if let (Some(m), Some((_, c))) = (&self.cluster, guard.cluster()) {
            advance(&m.batches, c.batches);
            advance(&m.operations, c.operations);
            advance(&m.retries, c.retries);
            advance(&m.failures, c.failures);
            advance(&m.config_reloads, c.config_reloads);
            m.heartbeat_up.set(i64::from(!c.heartbeat_failing));
            advance(&m.allowance_top_ups, c.allowance_top_ups);
            advance(&m.allowance_returns, c.allowance_returns);
            advance(&m.allowance_reclaims, c.allowance_reclaims);
            advance(&m.allowance_denials, c.allowance_denials);
            advance(&m.false_denials, c.false_denials);
            m.live_instances.set(c.live_instances);
        }
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
                    self.spent.get_or_create(&labels).set(used.micros());
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
        text_format(&out)
    }
}

/// The Prometheus text format (0.0.4, what `/metrics` is served as) from the registry's
/// OpenMetrics text: a counter's HELP and TYPE lines name it with its `_total` suffix, as
/// its samples do, and there is no `# EOF` line.
pub fn text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        match meta {
            Some(prefix) => {
                let rest = &line[prefix.len()..];
                let name = rest.split(' ').next().unwrap_or_default();
                if counters.contains(name) {
                    out.push_str(prefix);
                    out.push_str(name);
                    out.push_str("_total");
                    out.push_str(&rest[name.len()..]);
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A method as a label: the standard ones by name, any other as `other` (a client may
/// send any token as a method; each would otherwise start new series).
pub fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// Records each request's latency under its route template (never the raw path).
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(req.method()).to_owned();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_in_the_text_format() {
        let om = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total 3\n\
                  # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n# EOF\n";
        assert_eq!(
            text_format(om),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\n\
             x_requests_total 3\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n"
        );
    }

    #[test]
    fn unknown_methods_are_other() {
        assert_eq!(method_label(&axum::http::Method::GET), "GET");
        let invented = axum::http::Method::from_bytes(b"INVENTED").unwrap();
        assert_eq!(method_label(&invented), "other");
    }
}
