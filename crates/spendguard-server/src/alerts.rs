//! Cost alerts and their webhook delivery.
//!
//! - **Raising.** The guard's writer notes every scope whose spend became durable
//!   ([`SpendWatch`](spendguard_guard::SpendWatch)); the alert engine, one task, takes those
//!   scopes, compares their current day and month spend with their cost budgets, and raises
//!   an alert for the highest configured threshold reached (and a `projected` alert when the
//!   month-to-date run rate projects the monthly budget to be exceeded). Nothing of this
//!   runs on the decision path.
//! - **Exactly once.** An alert is persisted with a unique key (scope, window, window start,
//!   threshold, kind): a second insert, from a concurrent evaluation, a restart or another
//!   instance, does nothing. The webhook deliveries of an alert are created in the same
//!   transaction as the alert, so each alert is queued for delivery exactly once.
//! - **Delivery.** A second task POSTs due deliveries, signed with HMAC-SHA256 of
//!   `<timestamp>.<delivery id>.<body>` (`X-Spendguard-Signature: t=<unix seconds>,v1=<hex>`;
//!   see [`sign`]), and records each outcome: delivered, retry
//!   with exponential backoff (1 s, 2 s, 4 s … at most one hour apart), or failed after the
//!   configured attempts. The state is in the database, so a restart resumes where it
//!   stopped; a crash between a receiver's 2xx and its recording sends that one delivery
//!   again (at least once: receivers dedupe by `X-Spendguard-Delivery`).

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use spendguard_core::config::AlertsConfig;
use spendguard_core::{ConfigError, Micros, Money, ScopeKey, Window};
use spendguard_guard::Guard;
use spendguard_store::{
    AlertKind, AlertRecord, AnyStore, Delivery, DeliveryOutcome, NewAlert, StoreError,
};
use tokio::sync::Notify;

use crate::api::Rfc3339;
use crate::dashboard::usd_cents;

const MICROS_PER_HOUR: i64 = 3_600_000_000;
/// The longest wait between two attempts of one delivery.
const MAX_BACKOFF_US: i64 = MICROS_PER_HOUR;
/// The shortest time between two alert evaluations: changed scopes gather meanwhile.
const EVALUATE_EVERY: Duration = Duration::from_millis(250);
/// How long one webhook request may take.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Cluster mode: how long a claimed delivery is this instance's before another may send it
/// (an instance that died mid-delivery); well above `WEBHOOK_TIMEOUT`.
const DELIVERY_LEASE_US: i64 = 60_000_000;

/// The alert settings, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertSettings {
    /// Sorted, without duplicates.
    pub thresholds: Vec<u32>,
    pub projected: bool,
    pub projected_after_us: i64,
    pub webhook_urls: Vec<String>,
    /// Destinations sent Slack-format messages instead of signed JSON.
    pub slack_urls: Vec<String>,
    pub webhook_secret: String,
    pub max_attempts: u32,
}

impl AlertSettings {
    /// Every destination of a new alert: the signed webhooks, then the Slack ones.
    pub fn destinations(&self) -> Vec<String> {
        let mut all = self.webhook_urls.clone();
        all.extend(self.slack_urls.iter().cloned());
        all
    }
}

impl Default for AlertSettings {
    fn default() -> Self {
        let config = spendguard_core::Config::default();
        AlertSettings::from_config(&config.alerts, None)
            .expect("the built-in alert settings are valid")
    }
}

impl AlertSettings {
    /// From the `[alerts]` section; `secret` (from `SPENDGUARD_WEBHOOK_SECRET`) replaces the
    /// configured secret when given.
    pub fn from_config(
        config: &AlertsConfig,
        secret: Option<String>,
    ) -> Result<AlertSettings, ConfigError> {
        let thresholds = config.validate()?;
        let webhook_secret = secret.unwrap_or_else(|| config.webhook_secret.clone());
        if !config.webhook_urls.is_empty() && webhook_secret.is_empty() {
            return Err(ConfigError::Invalid {
                path: "alerts.webhook_secret".into(),
                reason: "must be set (or SPENDGUARD_WEBHOOK_SECRET) when webhook_urls are \
                         configured: receivers verify the signature with it"
                    .into(),
            });
        }
        Ok(AlertSettings {
            thresholds,
            projected: config.projected,
            projected_after_us: i64::from(config.projected_after_hours) * MICROS_PER_HOUR,
            webhook_urls: config.webhook_urls.clone(),
            slack_urls: config.slack_webhook_urls.clone(),
            webhook_secret,
            max_attempts: config.webhook_max_attempts,
        })
    }
}

/// The unique key of an alert.
type AlertKey = (ScopeKey, Window, Micros, u32, AlertKind);

fn key_of(a: &NewAlert) -> AlertKey {
    (
        a.scope.clone(),
        a.window,
        a.window_start,
        a.threshold_percent,
        a.kind,
    )
}

/// The alert engine and the webhook dispatcher of one server.
pub struct Alerts {
    settings: AlertSettings,
    guard: Guard<AnyStore>,
    /// Keys of alerts known to be persisted (a cache that saves inserts; the database's
    /// unique key is what makes alerts exactly-once). Only current windows are kept.
    raised: Mutex<HashSet<AlertKey>>,
    /// Alerts raised but not persisted yet (the store failed): retried at the next run.
    pending: Mutex<Vec<NewAlert>>,
    evaluating: tokio::sync::Mutex<()>,
    delivering: tokio::sync::Mutex<()>,
    deliver_now: Notify,
    client: reqwest::Client,
    stopping: tokio::sync::watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    counts: AlertCounts,
    /// The guard's dead-letter count when the last dead-letter alert was persisted.
    dead_letters_seen: AtomicU64,
}

/// Counters of the alert engine and the dispatcher since start (for metrics).
#[derive(Debug, Default)]
pub struct AlertCounts {
    pub raised: AtomicU64,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub failed: AtomicU64,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts")
            .field("thresholds", &self.settings.thresholds)
            .field("webhooks", &self.settings.webhook_urls.len())
            .finish_non_exhaustive()
    }
}

impl Alerts {
    /// Starts watching the guard's spend.
    pub fn new(guard: Guard<AnyStore>, settings: AlertSettings) -> Alerts {
        guard.spend_watch().enable();
        let client = reqwest::Client::builder()
            .timeout(WEBHOOK_TIMEOUT)
            .user_agent(concat!("spendguard/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Alerts {
            settings,
            guard,
            raised: Mutex::new(HashSet::new()),
            pending: Mutex::new(Vec::new()),
            evaluating: tokio::sync::Mutex::new(()),
            delivering: tokio::sync::Mutex::new(()),
            deliver_now: Notify::new(),
            client,
            stopping: tokio::sync::watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
            counts: AlertCounts::default(),
            dead_letters_seen: AtomicU64::new(0),
        }
    }

    pub fn settings(&self) -> &AlertSettings {
        &self.settings
    }

    pub fn counts(&self) -> &AlertCounts {
        &self.counts
    }

    /// What the scopes whose spend changed have crossed since the last run: returns the
    /// alerts newly persisted. Safe to call concurrently (runs are serialized).
    pub async fn evaluate(&self) -> Result<Vec<AlertRecord>, StoreError> {
        let _run = self.evaluating.lock().await;
        let now = self.guard.now();
        let ledger = self.guard.ledger();
        let periods = ledger.policy().calendar.periods(now);
        let mut new: Vec<NewAlert> = std::mem::take(&mut *lock(&self.pending));
        {
            let mut raised = lock(&self.raised);
            // Alerts of finished windows can never be raised again: forget them.
            raised.retain(|(_, w, start, _, _)| match w {
                Window::Day => *start >= periods.day.start,
                _ => *start >= periods.month.start,
            });
            for (scope, tier) in self.guard.spend_watch().take() {
                let budget = ledger.budget_for(&scope, tier.as_ref());
                let soft = ledger.soft_budget_for(&scope, tier.as_ref());
                let ((day, _), (month, _)) = ledger.scope_totals(&scope, now);
                // Soft budgets raise alerts at the same thresholds, as their own kind.
                let windows = [
                    (
                        Window::Day,
                        day,
                        budget.daily,
                        periods.day,
                        AlertKind::Threshold,
                    ),
                    (
                        Window::Month,
                        month,
                        budget.monthly,
                        periods.month,
                        AlertKind::Threshold,
                    ),
                    (Window::Day, day, soft.daily, periods.day, AlertKind::Soft),
                    (
                        Window::Month,
                        month,
                        soft.monthly,
                        periods.month,
                        AlertKind::Soft,
                    ),
                ];
                for (window, spent, cap, period, kind) in windows {
                    let Some(cap) = cap else { continue };
                    let mut candidates = Vec::new();
                    // Only the highest threshold reached: spend that jumps past several at
                    // once raises one alert, not one per threshold.
                    if let Some(&t) = self
                        .settings
                        .thresholds
                        .iter()
                        .rev()
                        .find(|&&t| reached(spent, cap, t))
                    {
                        candidates.push((t, kind, spent));
                    }
                    if window == Window::Month
                        && kind == AlertKind::Threshold
                        && self.settings.projected
                        && let Some(projected) = projection(
                            spent,
                            cap,
                            now,
                            period.start,
                            period.end,
                            self.settings.projected_after_us,
                        )
                    {
                        candidates.push((100, AlertKind::Projected, projected));
                    }
                    for (threshold_percent, kind, amount) in candidates {
                        let alert = NewAlert {
                            scope: scope.clone(),
                            window,
                            window_start: period.start,
                            threshold_percent,
                            kind,
                            amount,
                            limit: cap,
                            created_at: now,
                        };
                        let key = key_of(&alert);
                        if !raised.contains(&key) && !new.iter().any(|a| key_of(a) == key) {
                            new.push(alert);
                        }
                    }
                }
            }
        }
        // Events the store refused for good: an alert, at most one a day, while new ones
        // come (the database's unique key keeps it once across restarts too).
        let dead_letters = self.guard.stats().dead_letters;
        if dead_letters > self.dead_letters_seen.load(Ordering::Relaxed) {
            let alert = NewAlert {
                scope: ScopeKey::Global,
                window: Window::Day,
                window_start: periods.day.start,
                threshold_percent: 0,
                kind: AlertKind::DeadLetter,
                amount: Money::ZERO,
                limit: Money::ZERO,
                created_at: now,
            };
            let key = key_of(&alert);
            if lock(&self.raised).contains(&key) {
                self.dead_letters_seen
                    .store(dead_letters, Ordering::Relaxed);
            } else if !new.iter().any(|a| key_of(a) == key) {
                new.push(alert);
            }
        }
        if new.is_empty() {
            return Ok(Vec::new());
        }
        match self
            .guard
            .store()
            .insert_alerts(&new, &self.settings.destinations())
            .await
        {
            Ok(inserted) => {
                lock(&self.raised).extend(new.iter().map(key_of));
                self.dead_letters_seen
                    .fetch_max(dead_letters, Ordering::Relaxed);
                self.counts
                    .raised
                    .fetch_add(inserted.len() as u64, Ordering::Relaxed);
                for r in &inserted {
                    let a = &r.alert;
                    tracing::warn!(
                        alert = r.id,
                        kind = a.kind.as_str(),
                        scope = a.scope.kind().as_str(),
                        scope_id = a.scope.id(),
                        window = a.window.as_str(),
                        threshold_percent = a.threshold_percent,
                        amount_usd = %a.amount,
                        limit_usd = %a.limit,
                        "cost alert"
                    );
                }
                let destinations =
                    self.settings.webhook_urls.len() + self.settings.slack_urls.len();
                if !inserted.is_empty() && destinations > 0 {
                    self.deliver_now.notify_one();
                }
                Ok(inserted)
            }
            Err(e) => {
                *lock(&self.pending) = new;
                Err(e)
            }
        }
    }

    /// Sends every due delivery once; returns how many were attempted. Safe to call
    /// concurrently (runs are serialized, so a delivery is never sent twice at once).
    pub async fn deliver_due(&self) -> Result<usize, StoreError> {
        let _run = self.delivering.lock().await;
        let mut attempted = 0;
        loop {
            let now = self.guard.now();
            // In a cluster every instance dispatches: each claims what it sends.
            let due = match (self.guard.cluster(), self.guard.store()) {
                (Some(_), AnyStore::Postgres(pg)) => {
                    // Few at a time: all are sent (each within `WEBHOOK_TIMEOUT`)
                    // well inside the lease.
                    pg.claim_due_deliveries(now, 4, DELIVERY_LEASE_US).await?
                }
                _ => self.guard.store().due_deliveries(now, 64).await?,
            };
            if due.is_empty() {
                return Ok(attempted);
            }
            for d in due {
                let outcome = self.attempt(&d).await;
                let counter = match &outcome {
                    DeliveryOutcome::Delivered { .. } => &self.counts.delivered,
                    DeliveryOutcome::Retry { .. } => &self.counts.retried,
                    DeliveryOutcome::Failed { .. } => &self.counts.failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                match &outcome {
                    DeliveryOutcome::Delivered { .. } => {
                        tracing::info!(delivery = d.id, alert = d.alert.id, "webhook delivered")
                    }
                    DeliveryOutcome::Retry {
                        next_attempt_at,
                        error,
                    } => tracing::warn!(
                        delivery = d.id,
                        alert = d.alert.id,
                        error = %error,
                        retry_at = %crate::api::rfc3339(*next_attempt_at),
                        "webhook failed; will retry"
                    ),
                    DeliveryOutcome::Failed { error } => tracing::error!(
                        delivery = d.id,
                        alert = d.alert.id,
                        error = %error,
                        "webhook failed for good"
                    ),
                }
                self.guard.store().finish_delivery(d.id, &outcome).await?;
                attempted += 1;
            }
        }
    }

    async fn attempt(&self, d: &Delivery) -> DeliveryOutcome {
        // The format is the destination's as configured now; a destination no longer
        // configured gets the signed JSON.
        let slack = self.settings.slack_urls.contains(&d.url);
        let body = if slack {
            serde_json::to_vec(&slack_payload(&d.alert))
        } else {
            serde_json::to_vec(&payload(&d.alert))
        };
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                return DeliveryOutcome::Failed {
                    error: e.to_string(),
                };
            }
        };
        let mut request = self
            .client
            .post(&d.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if !slack {
            request = request.header(
                "X-Spendguard-Signature",
                sign(
                    &self.settings.webhook_secret,
                    self.guard.now().div_euclid(1_000_000),
                    d.id,
                    &body,
                ),
            );
        }
        let result = request
            .header("X-Spendguard-Delivery", d.id.to_string())
            .header("X-Spendguard-Attempt", (d.attempts + 1).to_string())
            .body(body)
            .send()
            .await;
        let error = match result {
            Ok(resp) if resp.status().is_success() => {
                return DeliveryOutcome::Delivered {
                    at: self.guard.now(),
                };
            }
            Ok(resp) => format!("the receiver answered {}", resp.status()),
            Err(e) => format!("request failed: {e}"),
        };
        let attempts = d.attempts + 1;
        if attempts >= self.settings.max_attempts {
            DeliveryOutcome::Failed { error }
        } else {
            DeliveryOutcome::Retry {
                next_attempt_at: self.guard.now().saturating_add(backoff(d.attempts)),
                error,
            }
        }
    }

    /// Runs the engine and the dispatcher until [`Alerts::stop`]: each wakes when there is
    /// work, and at least once a second (retries come due by time).
    pub fn spawn(self: &std::sync::Arc<Self>) {
        let me = self.clone();
        let mut stop = self.stopping.subscribe();
        let engine = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = me.guard.spend_watch().changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                // Let changes gather: one evaluation (one store transaction) per interval,
                // however busy the writer is.
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(EVALUATE_EVERY) => {}
                }
                if let Err(e) = me.evaluate().await {
                    tracing::warn!(error = %e, "could not persist alerts; will retry");
                }
            }
        });
        let me = self.clone();
        let mut stop = self.stopping.subscribe();
        let dispatcher = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = me.deliver_now.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                if let Err(e) = me.deliver_due().await {
                    tracing::warn!(error = %e, "could not read or update webhook deliveries");
                }
            }
        });
        lock(&self.tasks).extend([engine, dispatcher]);
    }

    /// Stops the background tasks (after their current run) and waits for them; then
    /// evaluates once more, so spend written last still raises its alerts.
    pub async fn stop(&self) {
        let _ = self.stopping.send(true);
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for t in tasks {
            let _ = t.await;
        }
        if let Err(e) = self.evaluate().await {
            tracing::warn!(error = %e, "could not persist the last alerts");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `spent >= threshold% of cap`, exactly (integer arithmetic).
pub fn reached(spent: Money, cap: Money, threshold_percent: u32) -> bool {
    i128::from(spent.micros()) * 100 >= i128::from(cap.micros()) * i128::from(threshold_percent)
}

/// The month's projected spend, when it exceeds `cap` while spend has not reached it yet,
/// and the month is at least `after_us` old: `spent × month length ÷ time elapsed`.
pub fn projection(
    spent: Money,
    cap: Money,
    now: Micros,
    start: Micros,
    end: Micros,
    after_us: i64,
) -> Option<Money> {
    let elapsed = now.saturating_sub(start);
    if elapsed <= 0 || elapsed < after_us || spent >= cap || spent == Money::ZERO {
        return None;
    }
    let length = end.saturating_sub(start);
    let projected = i128::from(spent.micros()) * i128::from(length) / i128::from(elapsed);
    let projected = Money::from_micros(i64::try_from(projected).unwrap_or(i64::MAX));
    (projected > cap).then_some(projected)
}

/// The wait before the next attempt, after `attempts_before` failed attempts and this one:
/// 1 s, 2 s, 4 s, … at most an hour.
pub fn backoff(attempts_before: u32) -> i64 {
    let secs = 1i64 << attempts_before.min(12);
    (secs * 1_000_000).min(MAX_BACKOFF_US)
}

/// The signature header's value: `t=<unix seconds>,v1=<hex of HMAC-SHA256(secret,
/// "<t>.<delivery id>.<body>")>`. The timestamp and the delivery id are signed with the
/// body, so a receiver that checks the timestamp is recent and remembers the delivery ids
/// it has seen cannot be sent a captured request again.
pub fn sign(secret: &str, timestamp: i64, delivery: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any size");
    mac.update(format!("{timestamp}.{delivery}.").as_bytes());
    mac.update(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// An alert as JSON: in `GET /v1/alerts`, and as a webhook's body.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct AlertOut {
    pub id: i64,
    /// Always `spendguard.alert` (for receivers that take several kinds of events).
    #[serde(rename = "type")]
    pub event_type: &'static str,
    /// `threshold`, `projected`, `soft_threshold` (a soft budget) or `dead_letter`.
    #[schemars(with = "crate::openapi::AlertKindName")]
    pub kind: &'static str,
    #[schemars(with = "crate::openapi::ScopeName")]
    pub scope: &'static str,
    pub scope_id: String,
    /// `null` for the global scope.
    pub tenant_id: Option<String>,
    #[schemars(with = "crate::openapi::WindowName")]
    pub window: &'static str,
    pub window_start: Rfc3339,
    pub threshold_percent: u32,
    /// The budget's name: its scope, window and kind (`tenant acme daily budget`, `user u1
    /// (tenant acme) monthly soft budget`).
    pub budget: String,
    /// Spend when raised; for `projected`, the projected spend of the month.
    #[schemars(with = "crate::openapi::Usd")]
    pub amount_usd: Money,
    #[schemars(with = "crate::openapi::Usd")]
    pub limit_usd: Money,
    pub created_at: Rfc3339,
    pub message: String,
}

pub fn payload(r: &AlertRecord) -> AlertOut {
    let a = &r.alert;
    let scope = match a.scope.tenant() {
        Some(t) if !matches!(a.scope, ScopeKey::Tenant(_)) => {
            format!(
                "{} {} (tenant {})",
                a.scope.kind().as_str(),
                a.scope.id(),
                t
            )
        }
        _ => format!("{} {}", a.scope.kind().as_str(), a.scope.id()),
    };
    let window = if a.window == Window::Day {
        "daily"
    } else {
        "monthly"
    };
    let budget = match a.kind {
        AlertKind::Soft => format!("{scope} {window} soft budget"),
        AlertKind::DeadLetter => "usage database".to_owned(),
        _ => format!("{scope} {window} budget"),
    };
    let message = match a.kind {
        AlertKind::Threshold => format!(
            "{scope} has spent {} of its {} {window} budget ({}% threshold)",
            usd_cents(a.amount),
            usd_cents(a.limit),
            a.threshold_percent
        ),
        AlertKind::Soft => format!(
            "{scope} has spent {} of its {} {window} soft budget ({}% threshold; a soft \
             budget alerts and never refuses)",
            usd_cents(a.amount),
            usd_cents(a.limit),
            a.threshold_percent
        ),
        AlertKind::Projected => format!(
            "{scope} is projected to spend {} this month, over its {} monthly budget",
            usd_cents(a.amount),
            usd_cents(a.limit)
        ),
        AlertKind::DeadLetter => "the usage database refused events for good today; they \
             are kept as dead letters (see /readyz and spendguard_dead_letters_total)"
            .to_owned(),
    };
    AlertOut {
        id: r.id,
        event_type: "spendguard.alert",
        kind: a.kind.as_str(),
        scope: a.scope.kind().as_str(),
        scope_id: a.scope.id().to_owned(),
        tenant_id: a.scope.tenant().map(|t| t.as_str().to_owned()),
        window: a.window.as_str(),
        window_start: Rfc3339(a.window_start),
        threshold_percent: a.threshold_percent,
        budget,
        amount_usd: a.amount,
        limit_usd: a.limit,
        created_at: Rfc3339(a.created_at),
        message,
    }
}

/// An alert as a Slack-compatible incoming-webhook message: `text` (the notification's
/// fallback) and `blocks` (a header naming the budget, the message, and the figures in
/// cents). Text is escaped for Slack's markup (`&`, `<`, `>`).
pub fn slack_payload(r: &AlertRecord) -> serde_json::Value {
    let out = payload(r);
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let title = match r.alert.kind {
        AlertKind::DeadLetter => "spendguard: events kept as dead letters".to_owned(),
        AlertKind::Projected => format!("spendguard: {} projected over", out.budget),
        _ => format!("spendguard: {} at {}%", out.budget, out.threshold_percent),
    };
    // A header's text is at most 150 characters.
    let title: String = title.chars().take(150).collect();
    let mut fields = vec![
        serde_json::json!({ "type": "mrkdwn", "text": format!("*Budget*\n{}", esc(&out.budget)) }),
        serde_json::json!({ "type": "mrkdwn", "text": format!("*Kind*\n{}", out.kind) }),
    ];
    if r.alert.kind != AlertKind::DeadLetter {
        fields.push(serde_json::json!({
            "type": "mrkdwn",
            "text": format!("*Spend*\n{}", usd_cents(r.alert.amount)),
        }));
        fields.push(serde_json::json!({
            "type": "mrkdwn",
            "text": format!("*Limit*\n{}", usd_cents(r.alert.limit)),
        }));
    }
    serde_json::json!({
        "text": esc(&out.message),
        "blocks": [
            { "type": "header", "text": { "type": "plain_text", "text": title, "emoji": false } },
            { "type": "section", "text": { "type": "mrkdwn", "text": esc(&out.message) }, "fields": fields },
            { "type": "context", "elements": [ { "type": "mrkdwn", "text": format!(
                "alert {} · {} window from {}", out.id, out.window, crate::api::rfc3339(r.alert.window_start)
            ) } ] },
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd(s: &str) -> Money {
        Money::parse_usd(s).unwrap()
    }

    #[test]
    fn thresholds_are_exact() {
        assert!(!reached(usd("4.999999"), usd("10"), 50));
        assert!(reached(usd("5"), usd("10"), 50));
        assert!(reached(usd("10"), usd("10"), 100));
        assert!(!reached(usd("9.999999"), usd("10"), 100));
        assert!(reached(usd("0.01"), Money::ZERO, 100));
        assert!(reached(Money::MAX, Money::MAX, 100));
    }

    #[test]
    fn projection_extrapolates_the_run_rate() {
        let day = 86_400_000_000i64;
        let (start, end) = (0, 30 * day);
        // $40 in 10 days of 30: $120 projected.
        assert_eq!(
            projection(usd("40"), usd("100"), 10 * day, start, end, day),
            Some(usd("120"))
        );
        assert_eq!(
            projection(usd("30"), usd("100"), 10 * day, start, end, day),
            None
        );
        // Too early in the month, or already over the cap (the 100% alert says so).
        assert_eq!(
            projection(usd("40"), usd("100"), day / 2, start, end, day),
            None
        );
        assert_eq!(
            projection(usd("100"), usd("100"), 10 * day, start, end, day),
            None
        );
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        assert_eq!(backoff(0), 1_000_000);
        assert_eq!(backoff(1), 2_000_000);
        assert_eq!(backoff(5), 32_000_000);
        assert_eq!(backoff(12), MAX_BACKOFF_US);
        assert_eq!(backoff(40), MAX_BACKOFF_US);
    }

    #[test]
    fn signature_covers_timestamp_delivery_and_body() {
        // RFC 4231, test case 2: the signed text is "<t>.<delivery>.<body>".
        let (t, d) = (1_700_000_000, 42);
        let text = "what do ya want for nothing?";
        let signed = format!("{t}.{d}.{text}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(signed.as_bytes());
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(
            sign("Jefe", t, d, text.as_bytes()),
            format!("t={t},v1={expected}")
        );
        // Another timestamp or delivery id, same body: another signature.
        assert_ne!(
            sign("Jefe", t + 1, d, text.as_bytes()),
            sign("Jefe", t, d, text.as_bytes())
        );
        assert_ne!(
            sign("Jefe", t, d + 1, text.as_bytes()),
            sign("Jefe", t, d, text.as_bytes())
        );
    }

    #[test]
    fn settings_need_a_secret_with_webhooks() {
        let mut config = spendguard_core::Config::default().alerts;
        config.webhook_urls = vec!["http://127.0.0.1:9/hook".into()];
        assert!(
            AlertSettings::from_config(&config, None)
                .unwrap_err()
                .to_string()
                .starts_with("alerts.webhook_secret: must be set")
        );
        let s = AlertSettings::from_config(&config, Some("s3cret".into())).unwrap();
        assert_eq!(s.webhook_secret, "s3cret");
        assert_eq!(s.thresholds, vec![50, 80, 90, 100]);
    }
}
