//! Typed configuration: the TOML a user writes, merged over the built-in defaults and
//! validated once into a [`Policy`].
//!
//! Loading is pure: it takes the file's text, never a path. Errors name the key path
//! (`tiers.pro.usd_per_day: ...`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::ids::TierName;
use crate::money::Money;
use crate::policy::{Budget, Policy, ShadowMask, TenantRules, Tier};
use crate::prices::{Price, PriceTable, UnknownModelPolicy};
use crate::window::Calendar;

/// The built-in configuration, as printed by `spendguard config defaults`.
pub const DEFAULTS_TOML: &str = include_str!("../data/defaults.toml");

/// A configuration that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not TOML.
    #[error("{0}")]
    Syntax(String),
    /// A key has a bad value, or is not a known key.
    #[error("{}{reason}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
    Invalid { path: String, reason: String },
}

impl ConfigError {
    fn invalid(path: impl Into<String>, reason: impl fmt::Display) -> Self {
        ConfigError::Invalid {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

/// A limit: a value, or `"unlimited"`, which also removes a default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Limit<T> {
    #[default]
    Unlimited,
    Value(T),
}

impl<T: Copy> Limit<T> {
    pub fn value(self) -> Option<T> {
        match self {
            Limit::Unlimited => None,
            Limit::Value(v) => Some(v),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Limit<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IntoDeserializer, Visitor, value};
        struct LimitVisitor<T>(std::marker::PhantomData<T>);
        // Each primitive is handed on to `T`, so its own error message reaches the user.
        impl<'de, T: Deserialize<'de>> Visitor<'de> for LimitVisitor<T> {
            type Value = Limit<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a limit or \"unlimited\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Limit<T>, E> {
                if v == "unlimited" {
                    return Ok(Limit::Unlimited);
                }
                T::deserialize(value::StrDeserializer::<E>::new(v)).map(Limit::Value)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Limit<T>, E> {
                T::deserialize(IntoDeserializer::<E>::into_deserializer(v)).map(Limit::Value)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Limit<T>, E> {
                T::deserialize(IntoDeserializer::<E>::into_deserializer(v)).map(Limit::Value)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Limit<T>, E> {
                T::deserialize(IntoDeserializer::<E>::into_deserializer(v)).map(Limit::Value)
            }
        }
        d.deserialize_any(LimitVisitor(std::marker::PhantomData))
    }
}

impl<T: Serialize> Serialize for Limit<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Limit::Unlimited => s.serialize_str("unlimited"),
            Limit::Value(v) => v.serialize(s),
        }
    }
}

/// Which limits of a section are in shadow (observed, never refusing): `true` for all of
/// them, `false` for none, or a list of limit names (`usd_per_day`, `requests_per_minute`,
/// ...).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, expecting = "true, false or a list of limit names")]
pub enum ShadowConfig {
    All(bool),
    Limits(Vec<String>),
    #[default]
    #[serde(skip)]
    Off,
}

impl ShadowConfig {
    fn is_off(&self) -> bool {
        matches!(self, ShadowConfig::Off | ShadowConfig::All(false))
    }
}

/// The limit names a `shadow` list may hold, and the limits each one stands for (of every
/// scope; a section keeps those of its own).
const SHADOW_NAMES: [(&str, ShadowMask); 8] = [
    (
        "usd_per_day",
        ShadowMask::budget(0, false)
            .union(ShadowMask::budget(1, false))
            .union(ShadowMask::budget(2, false))
            .union(ShadowMask::budget(3, false)),
    ),
    (
        "usd_per_month",
        ShadowMask::budget(0, true)
            .union(ShadowMask::budget(1, true))
            .union(ShadowMask::budget(2, true))
            .union(ShadowMask::budget(3, true)),
    ),
    ("requests_per_minute", ShadowMask::REQUESTS_PER_MINUTE),
    ("requests_per_day", ShadowMask::REQUESTS_PER_DAY),
    ("tokens_per_day", ShadowMask::TOKENS_PER_DAY),
    ("max_concurrent", ShadowMask::MAX_CONCURRENT),
    ("max_output_tokens", ShadowMask::MAX_OUTPUT_TOKENS),
    ("allowed_models", ShadowMask::ALLOWED_MODELS),
];

/// The limits of `value` within `section` (the limits the section sets); `path` is the
/// section's path, named in errors.
fn shadow_mask(
    path: &str,
    value: &ShadowConfig,
    section: ShadowMask,
) -> Result<ShadowMask, ConfigError> {
    let key = if path.is_empty() {
        "shadow".to_owned()
    } else {
        format!("{path}.shadow")
    };
    match value {
        ShadowConfig::Off | ShadowConfig::All(false) => Ok(ShadowMask::NONE),
        ShadowConfig::All(true) => Ok(section),
        ShadowConfig::Limits(names) => {
            let mut mask = ShadowMask::NONE;
            for (i, name) in names.iter().enumerate() {
                let bits = SHADOW_NAMES
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, b)| b.intersect(section))
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| {
                        let known: Vec<&str> = SHADOW_NAMES
                            .iter()
                            .filter(|(_, b)| !b.intersect(section).is_empty())
                            .map(|(n, _)| *n)
                            .collect();
                        ConfigError::invalid(
                            format!("{key}[{i}]"),
                            format!(
                                "`{name}` is not a limit of this section; one of {}",
                                known.join(", ")
                            ),
                        )
                    })?;
                mask = mask.union(bits);
            }
            Ok(mask)
        }
    }
}

/// Daily and monthly caps of one scope.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    #[serde(default)]
    pub usd_per_day: Limit<Money>,
    #[serde(default)]
    pub usd_per_month: Limit<Money>,
    /// Soft caps: reaching them raises alerts, never refuses a request.
    #[serde(default)]
    pub soft_usd_per_day: Limit<Money>,
    #[serde(default)]
    pub soft_usd_per_month: Limit<Money>,
    /// These budgets in shadow: `true`, or a list of `usd_per_day`, `usd_per_month`.
    #[serde(default, skip_serializing_if = "ShadowConfig::is_off")]
    pub shadow: ShadowConfig,
}

/// The `[tenant]` section: caps and rules applied to every tenant without its own
/// `[tenants.<id>]` section (budgets also yield to admin overrides).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    #[serde(default)]
    pub usd_per_day: Limit<Money>,
    #[serde(default)]
    pub usd_per_month: Limit<Money>,
    /// Soft caps of every tenant: reaching them raises alerts, never refuses a request.
    #[serde(default)]
    pub soft_usd_per_day: Limit<Money>,
    #[serde(default)]
    pub soft_usd_per_month: Limit<Money>,
    /// The tenant budgets in shadow: `true`, or a list of `usd_per_day`, `usd_per_month`.
    /// (A whole tenant is put in shadow by `[tenants.<id>] shadow`.)
    #[serde(default, skip_serializing_if = "ShadowConfig::is_off")]
    pub shadow: ShadowConfig,
    /// The tiers a tenant key may name on a request (admin keys may name any).
    #[serde(default)]
    pub allowed_tiers: Vec<String>,
    /// The largest fraction (0 < share <= 1) of each global budget one tenant may hold.
    #[serde(default)]
    pub max_share_of_global: Limit<f64>,
    /// The most user and company scopes one tenant may have in memory at once.
    #[serde(default)]
    pub max_tracked_subjects: Limit<u32>,
}

/// A `[tenants.<id>]` section: one tenant's rules; a key left out keeps the `[tenant]` one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantRulesConfig {
    #[serde(default)]
    pub allowed_tiers: Option<Vec<String>>,
    #[serde(default)]
    pub max_share_of_global: Option<Limit<f64>>,
    #[serde(default)]
    pub max_tracked_subjects: Option<Limit<u32>>,
    /// This tenant's own soft caps (alerts only), instead of the `[tenant]` ones.
    #[serde(default)]
    pub soft_usd_per_day: Option<Limit<Money>>,
    #[serde(default)]
    pub soft_usd_per_month: Option<Limit<Money>>,
    /// This tenant's limits in shadow: `true` for every limit of its requests but the
    /// global budgets, or a list of limit names.
    #[serde(default, skip_serializing_if = "ShadowConfig::is_off")]
    pub shadow: ShadowConfig,
}

/// The limits of one subscription tier. A limit left out is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    #[serde(default)]
    pub requests_per_minute: Limit<u32>,
    #[serde(default)]
    pub requests_per_day: Limit<u64>,
    #[serde(default)]
    pub tokens_per_day: Limit<u64>,
    #[serde(default)]
    pub usd_per_day: Limit<Money>,
    #[serde(default)]
    pub usd_per_month: Limit<Money>,
    #[serde(default)]
    pub max_concurrent: Limit<u32>,
    #[serde(default)]
    pub max_output_tokens: Limit<u64>,
    /// Glob patterns (`*`, `?`) of the models this tier may call. Absent: every model.
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
    /// Soft caps of each user: reaching them raises alerts, never refuses a request.
    #[serde(default)]
    pub soft_usd_per_day: Limit<Money>,
    #[serde(default)]
    pub soft_usd_per_month: Limit<Money>,
    /// The tier's limits in shadow: `true` for all, or a list of limit names.
    #[serde(default, skip_serializing_if = "ShadowConfig::is_off")]
    pub shadow: ShadowConfig,
}

/// What to do with new reservations while the store cannot be written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    #[default]
    Spool,
    Deny,
}

/// The log format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// How many instances serve one database.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerMode {
    /// One instance decides from memory (SQLite or PostgreSQL).
    #[default]
    Single,
    /// Any number of instances decide on PostgreSQL's rows (see docs/cluster.md).
    Cluster,
}

/// The `[server]` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub mode: ServerMode,
    pub listen: String,
    pub database: String,
    pub on_store_error: OnStoreError,
    pub spool_path: String,
    pub sync_every_batch: bool,
    pub log_format: LogFormat,
}

impl ServerConfig {
    /// Checks the values that the core can check without I/O.
    pub fn validate(&self) -> Result<std::net::SocketAddr, ConfigError> {
        if self.database.trim().is_empty() {
            return Err(ConfigError::invalid("server.database", "must not be empty"));
        }
        if self.spool_path.trim().is_empty() {
            return Err(ConfigError::invalid(
                "server.spool_path",
                "must not be empty",
            ));
        }
        self.listen.parse().map_err(|_| {
            ConfigError::invalid(
                "server.listen",
                format!("`{}` is not an address such as 127.0.0.1:8080", self.listen),
            )
        })
    }
}

/// The `[alerts]` section: cost alert thresholds and webhook delivery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Percentages of every cost budget (daily and monthly, of every scope) that raise an
    /// alert when spend reaches them.
    pub thresholds: Vec<u32>,
    /// Raise a "projected" alert when the month-to-date run rate projects a monthly
    /// budget to be exceeded.
    pub projected: bool,
    /// How far into the month (hours) before projecting: early run rates are noise.
    pub projected_after_hours: u32,
    /// URLs (`http://` or `https://`) every new alert is POSTed to.
    pub webhook_urls: Vec<String>,
    /// The HMAC-SHA256 key of `X-Spendguard-Signature`. Required with `webhook_urls`;
    /// `SPENDGUARD_WEBHOOK_SECRET` overrides it.
    pub webhook_secret: String,
    /// Attempts per delivery before it is marked failed (backoff doubles from 1 s, at most
    /// one hour apart).
    pub webhook_max_attempts: u32,
    /// Slack-compatible incoming webhooks (`http://` or `https://`): every new alert is
    /// POSTed to each as a Slack message (`text` and `blocks`), with the same outbox,
    /// retries and delivery ids as `webhook_urls`, unsigned (such endpoints authenticate by
    /// their secret URL).
    #[serde(default)]
    pub slack_webhook_urls: Vec<String>,
}

impl AlertsConfig {
    /// Checks the section; the thresholds come back sorted and without duplicates.
    pub fn validate(&self) -> Result<Vec<u32>, ConfigError> {
        if self.thresholds.len() > 16 {
            return Err(ConfigError::invalid(
                "alerts.thresholds",
                "at most 16 thresholds",
            ));
        }
        for (i, t) in self.thresholds.iter().enumerate() {
            if !(1..=1000).contains(t) {
                return Err(ConfigError::invalid(
                    format!("alerts.thresholds[{i}]"),
                    "must be a percentage from 1 to 1000",
                ));
            }
        }
        for (key, urls) in [
            ("webhook_urls", &self.webhook_urls),
            ("slack_webhook_urls", &self.slack_webhook_urls),
        ] {
            for (i, url) in urls.iter().enumerate() {
                let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
                if !scheme_ok || url.len() > 2048 || url.chars().any(char::is_whitespace) {
                    return Err(ConfigError::invalid(
                        format!("alerts.{key}[{i}]"),
                        format!("`{url}` is not an http:// or https:// URL"),
                    ));
                }
            }
        }
        for (i, url) in self.slack_webhook_urls.iter().enumerate() {
            if self.webhook_urls.contains(url) || self.slack_webhook_urls[..i].contains(url) {
                return Err(ConfigError::invalid(
                    format!("alerts.slack_webhook_urls[{i}]"),
                    format!("`{url}` is listed twice: each destination has one format"),
                ));
            }
        }
        if !(1..=100).contains(&self.webhook_max_attempts) {
            return Err(ConfigError::invalid(
                "alerts.webhook_max_attempts",
                "must be from 1 to 100",
            ));
        }
        if self.projected_after_hours > 24 * 27 {
            return Err(ConfigError::invalid(
                "alerts.projected_after_hours",
                "must be at most 648 (27 days)",
            ));
        }
        let mut t = self.thresholds.clone();
        t.sort_unstable();
        t.dedup();
        Ok(t)
    }
}

/// The `[http]` section: limits of the HTTP listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Connections open at once; more are closed at once.
    pub max_connections: u32,
    /// Seconds from a request's first byte until its headers must be complete.
    pub header_timeout_seconds: u64,
    /// Seconds a keep-alive connection may stay idle between requests.
    pub idle_timeout_seconds: u64,
}

impl HttpConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                "http.max_connections",
                "must be at least 1",
            ));
        }
        for (key, v) in [
            ("http.header_timeout_seconds", self.header_timeout_seconds),
            ("http.idle_timeout_seconds", self.idle_timeout_seconds),
        ] {
            if !(1..=86_400).contains(&v) {
                return Err(ConfigError::invalid(key, "must be from 1 to 86400"));
            }
        }
        Ok(())
    }
}

/// The `[metrics]` section: who may read `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A loopback address for a second listener serving `/metrics` without a key; empty:
    /// none (`/metrics` then needs the admin or the metrics key).
    pub open_listen: String,
}

impl MetricsConfig {
    /// The open listener's address, if one is configured; it must be a loopback address.
    pub fn validate(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        if self.open_listen.trim().is_empty() {
            return Ok(None);
        }
        let addr: std::net::SocketAddr = self.open_listen.parse().map_err(|_| {
            ConfigError::invalid(
                "metrics.open_listen",
                format!(
                    "`{}` is not an address such as 127.0.0.1:9464",
                    self.open_listen
                ),
            )
        })?;
        if !addr.ip().is_loopback() {
            return Err(ConfigError::invalid(
                "metrics.open_listen",
                "must be a loopback address (127.0.0.1 or [::1]): it serves metrics without a key",
            ));
        }
        Ok(Some(addr))
    }
}

/// The `[reports]` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportsConfig {
    /// Rows per page when a request gives no `limit`.
    pub default_limit: u32,
    /// Report queries running at once.
    pub max_concurrent: u32,
}

impl ReportsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=100_000).contains(&self.default_limit) {
            return Err(ConfigError::invalid(
                "reports.default_limit",
                "must be from 1 to 100000",
            ));
        }
        if self.max_concurrent == 0 {
            return Err(ConfigError::invalid(
                "reports.max_concurrent",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The `[gateway]` section: spendguard as an OpenAI- and Anthropic-compatible proxy. Off
/// while `upstreams` is empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The user charged when a request names none; empty: such a request is refused.
    pub default_user: String,
    /// The largest request body accepted on the gateway's routes.
    pub max_body_bytes: u64,
    /// Seconds an upstream call may take in all (a whole stream included).
    pub upstream_timeout_seconds: u64,
    /// Seconds the upstream is still read, after the client went away mid-stream, to learn
    /// the call's usage.
    pub drain_timeout_seconds: u64,
    pub upstreams: Vec<UpstreamConfig>,
}

/// The `[cluster]` section: how instances in cluster mode share busy budgets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The kinds of scope decided through allowances (capacity held by each instance)
    /// rather than on their shared rows: any of `global`, `tenant`, `company`.
    pub allowances: Vec<String>,
    /// Seconds after its last heartbeat an instance counts as gone: the others take back
    /// its allowances.
    pub lease_seconds: u64,
}

impl ClusterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for a in &self.allowances {
            if !["global", "tenant", "company"].contains(&a.as_str()) {
                return Err(ConfigError::invalid(
                    "cluster.allowances",
                    format!("`{a}` is not one of `global`, `tenant`, `company`"),
                ));
            }
        }
        if !(2..=3_600).contains(&self.lease_seconds) {
            return Err(ConfigError::invalid(
                "cluster.lease_seconds",
                "must be from 2 to 3600",
            ));
        }
        Ok(())
    }
}

/// One provider the gateway forwards to (`[[gateway.upstreams]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Named on each usage record it served.
    pub name: String,
    pub kind: UpstreamKind,
    /// The provider's API base, as its SDKs take it: `https://api.openai.com/v1`,
    /// `https://api.anthropic.com`.
    pub base_url: String,
    /// The environment variable holding the provider's API key (never logged, never sent
    /// to callers). Empty: no key is sent.
    pub api_key_env: String,
    /// The models it serves: names, or patterns with `*` and `?`.
    pub models: Vec<String>,
}

/// The API an upstream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamKind {
    Openai,
    Anthropic,
}

impl UpstreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamKind::Openai => "openai",
            UpstreamKind::Anthropic => "anthropic",
        }
    }
}

impl GatewayConfig {
    /// Whether the gateway is on (it has an upstream).
    pub fn enabled(&self) -> bool {
        !self.upstreams.is_empty()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.default_user.is_empty() && crate::UserId::parse(&self.default_user).is_err() {
            return Err(ConfigError::invalid(
                "gateway.default_user",
                "is not a valid user id",
            ));
        }
        if !(1024..=1 << 30).contains(&self.max_body_bytes) {
            return Err(ConfigError::invalid(
                "gateway.max_body_bytes",
                "must be from 1024 to 1073741824",
            ));
        }
        for (key, v) in [
            (
                "gateway.upstream_timeout_seconds",
                self.upstream_timeout_seconds,
            ),
            ("gateway.drain_timeout_seconds", self.drain_timeout_seconds),
        ] {
            if !(1..=86_400).contains(&v) {
                return Err(ConfigError::invalid(key, "must be from 1 to 86400"));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let at = |k: &str| format!("gateway.upstreams[{i}].{k}");
            if u.name.is_empty()
                || u.name.len() > 64
                || !u
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(ConfigError::invalid(
                    at("name"),
                    "must be 1 to 64 letters, digits, `-`, `_` or `.`",
                ));
            }
            if !names.insert(u.name.as_str()) {
                return Err(ConfigError::invalid(at("name"), "is used twice"));
            }
            if !(u.base_url.starts_with("http://") || u.base_url.starts_with("https://"))
                || u.base_url.len() <= "https://".len()
            {
                return Err(ConfigError::invalid(
                    at("base_url"),
                    "must be an http:// or https:// URL",
                ));
            }
            if u.models.is_empty() || u.models.iter().any(|m| m.is_empty()) {
                return Err(ConfigError::invalid(
                    at("models"),
                    "must name at least one model or pattern, none empty",
                ));
            }
        }
        Ok(())
    }
}

/// The whole configuration file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub http: HttpConfig,
    pub metrics: MetricsConfig,
    pub reports: ReportsConfig,
    pub alerts: AlertsConfig,
    pub gateway: GatewayConfig,
    pub cluster: ClusterConfig,
    pub time_zone: String,
    pub default_tier: String,
    pub reservation_ttl_seconds: u64,
    pub max_reservation_ttl_seconds: u64,
    /// A reservation whose estimate is above this amount (USD) may be held at most
    /// `large_reservation_max_ttl_seconds`.
    pub large_reservation_usd: Money,
    pub large_reservation_max_ttl_seconds: u64,
    /// The largest cost (USD) and token count (input plus output) one usage record may
    /// carry; a direct record or commit above them is refused (400).
    pub max_record_cost_usd: Money,
    pub max_record_tokens: u64,
    pub unknown_model: UnknownModelPolicy,
    #[serde(default)]
    pub default_price: Option<Price>,
    pub global: BudgetConfig,
    #[serde(default)]
    pub tenant: TenantConfig,
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantRulesConfig>,
    #[serde(default)]
    pub company: BudgetConfig,
    pub tiers: BTreeMap<String, TierConfig>,
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    /// Limits in shadow for every request: `true` puts the whole service in shadow (every
    /// limit observed, none refusing), a list of limit names those limits of every scope.
    #[serde(default, skip_serializing_if = "ShadowConfig::is_off")]
    pub shadow: ShadowConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config::from_toml("").expect("the built-in configuration is valid")
    }
}

/// Merges `over` into `base` key by key; tables merge, every other value replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

impl Config {
    /// Parses a user's TOML and merges it over the built-in defaults.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut base: toml::Table =
            toml::from_str(DEFAULTS_TOML).expect("the built-in configuration is valid TOML");
        let user: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        merge(&mut base, user);
        let de = toml::Value::Table(base);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            ConfigError::invalid(path, e.into_inner().message())
        })
    }

    /// Checks every value and builds the policy the ledger enforces.
    pub fn validate(&self) -> Result<Policy, ConfigError> {
        self.server.validate()?;
        self.http.validate()?;
        self.metrics.validate()?;
        self.reports.validate()?;
        self.alerts.validate()?;
        self.gateway.validate()?;
        self.cluster.validate()?;
        let calendar =
            Calendar::new(&self.time_zone).map_err(|e| ConfigError::invalid("time_zone", e))?;
        if self.reservation_ttl_seconds == 0 {
            return Err(ConfigError::invalid(
                "reservation_ttl_seconds",
                "must be at least 1",
            ));
        }
        if self.max_reservation_ttl_seconds < self.reservation_ttl_seconds {
            return Err(ConfigError::invalid(
                "max_reservation_ttl_seconds",
                "must be at least reservation_ttl_seconds",
            ));
        }
        const YEAR: u64 = 366 * 86_400;
        if self.max_reservation_ttl_seconds > YEAR {
            return Err(ConfigError::invalid(
                "max_reservation_ttl_seconds",
                "must be at most a year",
            ));
        }
        if self.unknown_model == UnknownModelPolicy::DefaultCost && self.default_price.is_none() {
            return Err(ConfigError::invalid(
                "default_price",
                "must be set when unknown_model = \"default_cost\"",
            ));
        }
        let mut tiers = BTreeMap::new();
        for (name, t) in &self.tiers {
            let path = format!("tiers.{name}");
            let tier_name = TierName::parse(name).map_err(|e| ConfigError::invalid(&path, e))?;
            if t.requests_per_minute == Limit::Value(0) {
                return Err(ConfigError::invalid(
                    format!("{path}.requests_per_minute"),
                    "must be at least 1 (or \"unlimited\")",
                ));
            }
            let patterns = match &t.allowed_models {
                None => None,
                Some(list) => {
                    for (i, p) in list.iter().enumerate() {
                        if p.is_empty() || p.len() > 256 {
                            return Err(ConfigError::invalid(
                                format!("{path}.allowed_models[{i}]"),
                                "must be 1 to 256 characters",
                            ));
                        }
                    }
                    Some(list.clone())
                }
            };
            let mut tier = Tier::new(
                t.requests_per_minute.value(),
                t.requests_per_day.value(),
                t.tokens_per_day.value(),
                Budget {
                    daily: t.usd_per_day.value(),
                    monthly: t.usd_per_month.value(),
                },
                t.max_concurrent.value(),
                t.max_output_tokens.value(),
                patterns,
            );
            tier.soft = Budget {
                daily: t.soft_usd_per_day.value(),
                monthly: t.soft_usd_per_month.value(),
            };
            tier.shadow = shadow_mask(&path, &t.shadow, ShadowMask::USER)?;
            tiers.insert(tier_name, tier);
        }
        let default_tier = TierName::parse(&self.default_tier)
            .map_err(|e| ConfigError::invalid("default_tier", e))?;
        if !tiers.contains_key(&default_tier) {
            return Err(ConfigError::invalid(
                "default_tier",
                format!("no tier named `{}` is configured", self.default_tier),
            ));
        }
        for name in self.prices.keys() {
            if crate::ids::ModelName::parse(name).is_err() {
                return Err(ConfigError::invalid(
                    format!("prices.{name}"),
                    "a model name is 1-128 characters of letters, digits and . _ : @ / -",
                ));
            }
        }
        let prices = PriceTable::builtin()
            .with_overrides(self.prices.clone())
            .with_unknown_policy(self.unknown_model, self.default_price);
        let budget = |b: &BudgetConfig| Budget {
            daily: b.usd_per_day.value(),
            monthly: b.usd_per_month.value(),
        };
        if self.large_reservation_max_ttl_seconds < self.reservation_ttl_seconds
            || self.large_reservation_max_ttl_seconds > self.max_reservation_ttl_seconds
        {
            return Err(ConfigError::invalid(
                "large_reservation_max_ttl_seconds",
                "must be from reservation_ttl_seconds to max_reservation_ttl_seconds",
            ));
        }
        if self.max_record_cost_usd <= Money::ZERO {
            return Err(ConfigError::invalid(
                "max_record_cost_usd",
                "must be more than zero",
            ));
        }
        if self.max_record_tokens == 0 {
            return Err(ConfigError::invalid(
                "max_record_tokens",
                "must be at least 1",
            ));
        }
        let soft = |b: &BudgetConfig| Budget {
            daily: b.soft_usd_per_day.value(),
            monthly: b.soft_usd_per_month.value(),
        };
        let shadow = shadow_mask("", &self.shadow, ShadowMask::ALL)?
            .union(shadow_mask(
                "global",
                &self.global.shadow,
                ShadowMask::budgets(0),
            )?)
            .union(shadow_mask(
                "tenant",
                &self.tenant.shadow,
                ShadowMask::budgets(1),
            )?)
            .union(shadow_mask(
                "company",
                &self.company.shadow,
                ShadowMask::budgets(2),
            )?);
        let default_rules = tenant_rules(
            "tenant",
            &tiers,
            &self.tenant.allowed_tiers,
            self.tenant.max_share_of_global,
            self.tenant.max_tracked_subjects,
        )?;
        let mut tenants = BTreeMap::new();
        for (id, t) in &self.tenants {
            let path = format!("tenants.{id}");
            let tenant_id =
                crate::ids::TenantId::parse(id).map_err(|e| ConfigError::invalid(&path, e))?;
            let rules = tenant_rules(
                &path,
                &tiers,
                t.allowed_tiers
                    .as_ref()
                    .unwrap_or(&self.tenant.allowed_tiers),
                t.max_share_of_global
                    .unwrap_or(self.tenant.max_share_of_global),
                t.max_tracked_subjects
                    .unwrap_or(self.tenant.max_tracked_subjects),
            )?;
            let rules = TenantRules {
                shadow: shadow_mask(&path, &t.shadow, ShadowMask::ALL_BUT_GLOBAL)?,
                soft: Budget {
                    daily: t
                        .soft_usd_per_day
                        .unwrap_or(self.tenant.soft_usd_per_day)
                        .value(),
                    monthly: t
                        .soft_usd_per_month
                        .unwrap_or(self.tenant.soft_usd_per_month)
                        .value(),
                },
                ..rules
            };
            tenants.insert(tenant_id, rules);
        }
        Ok(Policy {
            calendar,
            default_tier,
            tiers,
            global: budget(&self.global),
            tenant: Budget {
                daily: self.tenant.usd_per_day.value(),
                monthly: self.tenant.usd_per_month.value(),
            },
            company: budget(&self.company),
            tenant_rules: default_rules,
            tenants,
            prices,
            reservation_ttl_us: self.reservation_ttl_seconds as i64 * 1_000_000,
            max_reservation_ttl_us: self.max_reservation_ttl_seconds as i64 * 1_000_000,
            large_reservation: self.large_reservation_usd,
            large_reservation_max_ttl_us: self.large_reservation_max_ttl_seconds as i64 * 1_000_000,
            max_record_cost: self.max_record_cost_usd,
            max_record_tokens: self.max_record_tokens,
            shadow,
            soft_global: soft(&self.global),
            soft_tenant: Budget {
                daily: self.tenant.soft_usd_per_day.value(),
                monthly: self.tenant.soft_usd_per_month.value(),
            },
            soft_company: soft(&self.company),
        })
    }
}

/// Validates one tenant's rules (`path` is `tenant` or `tenants.<id>`).
fn tenant_rules(
    path: &str,
    tiers: &BTreeMap<TierName, Tier>,
    allowed: &[String],
    share: Limit<f64>,
    subjects: Limit<u32>,
) -> Result<TenantRules, ConfigError> {
    let mut allowed_tiers = Vec::with_capacity(allowed.len());
    for (i, name) in allowed.iter().enumerate() {
        let tier = TierName::parse(name)
            .ok()
            .filter(|t| tiers.contains_key(t))
            .ok_or_else(|| {
                ConfigError::invalid(
                    format!("{path}.allowed_tiers[{i}]"),
                    format!("no tier named `{name}` is configured"),
                )
            })?;
        allowed_tiers.push(tier);
    }
    let share_of_global_ppm = match share {
        Limit::Unlimited => None,
        Limit::Value(s) if s.is_finite() && s > 0.0 && s <= 1.0 => {
            // A fraction, not an amount: rounded to parts per million once, here.
            Some(((s * 1_000_000.0).round() as u32).max(1))
        }
        Limit::Value(_) => {
            return Err(ConfigError::invalid(
                format!("{path}.max_share_of_global"),
                "must be a fraction above 0 and at most 1 (or \"unlimited\")",
            ));
        }
    };
    if subjects == Limit::Value(0) {
        return Err(ConfigError::invalid(
            format!("{path}.max_tracked_subjects"),
            "must be at least 1 (or \"unlimited\")",
        ));
    }
    Ok(TenantRules {
        allowed_tiers,
        share_of_global_ppm,
        max_tracked_subjects: subjects.value(),
        shadow: ShadowMask::NONE,
        soft: Budget::default(),
    })
}

/// Parses, merges and validates in one step.
pub fn load(text: &str) -> Result<(Config, Policy), ConfigError> {
    let config = Config::from_toml(text)?;
    let policy = config.validate()?;
    Ok((config, policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_valid_and_match_the_spec() {
        let (config, policy) = load("").unwrap();
        assert_eq!(
            config.global.usd_per_day,
            Limit::Value(Money::from_usd(1000).unwrap())
        );
        assert_eq!(
            config.global.usd_per_month,
            Limit::Value(Money::from_usd(25_000).unwrap())
        );
        assert_eq!(policy.default_tier.as_str(), "free");
        for t in ["free", "pro", "enterprise"] {
            assert!(
                policy.tiers.contains_key(&TierName::parse(t).unwrap()),
                "{t}"
            );
        }
        assert_eq!(policy.prices.unknown_policy(), UnknownModelPolicy::Deny);
    }

    #[test]
    fn user_keys_merge_over_defaults() {
        let (config, _) = load(
            "time_zone = \"Europe/Berlin\"\n[tiers.pro]\nusd_per_day = 7.5\nmax_concurrent = \"unlimited\"\n[tiers.team]\nrequests_per_day = 10\n",
        )
        .unwrap();
        let pro = &config.tiers["pro"];
        assert_eq!(
            pro.usd_per_day,
            Limit::Value(Money::parse_usd("7.5").unwrap())
        );
        assert_eq!(pro.max_concurrent, Limit::Unlimited);
        // Untouched keys keep their defaults.
        assert_eq!(pro.requests_per_minute, Limit::Value(60));
        assert_eq!(config.tiers["team"].requests_per_day, Limit::Value(10));
        assert_eq!(config.tiers["team"].usd_per_day, Limit::Unlimited);
        assert!(config.tiers.contains_key("free"));
    }

    #[test]
    fn http_metrics_and_reports_sections_are_validated() {
        let c = Config::default();
        assert_eq!(c.http.max_connections, 1024);
        assert_eq!(c.reports.default_limit, 1000);
        assert_eq!(c.metrics.validate().unwrap(), None);
        assert!(
            err("[metrics]\nopen_listen = \"0.0.0.0:9464\"")
                .starts_with("metrics.open_listen: must be a loopback address")
        );
        let open = Config::from_toml("[metrics]\nopen_listen = \"127.0.0.1:9464\"").unwrap();
        assert!(open.metrics.validate().unwrap().is_some());
        assert!(err("[http]\nmax_connections = 0").starts_with("http.max_connections"));
        assert!(
            err("[http]\nheader_timeout_seconds = 0").starts_with("http.header_timeout_seconds")
        );
        assert!(err("[reports]\ndefault_limit = 0").starts_with("reports.default_limit"));
    }

    #[test]
    fn alerts_section_is_validated() {
        let (config, _) = load("").unwrap();
        assert_eq!(config.alerts.validate().unwrap(), vec![50, 80, 90, 100]);
        assert!(config.alerts.webhook_urls.is_empty());
        let (config, _) = load("[alerts]\nthresholds = [100, 50, 50]\n").unwrap();
        assert_eq!(config.alerts.validate().unwrap(), vec![50, 100]);
        assert_eq!(
            err("[alerts]\nthresholds = [0]\n"),
            "alerts.thresholds[0]: must be a percentage from 1 to 1000"
        );
        assert!(
            err("[alerts]\nwebhook_urls = [\"ftp://x\"]\n")
                .starts_with("alerts.webhook_urls[0]: `ftp://x` is not")
        );
        assert!(err("[alerts]\nthresholds = \"50\"\n").starts_with("alerts.thresholds"));
    }

    #[test]
    fn errors_name_the_key_path() {
        assert_eq!(
            err("[tiers.pro]\nusd_per_day = \"abc\""),
            "tiers.pro.usd_per_day: amount `abc` is not a decimal number of USD"
        );
        assert!(
            err("[tiers.pro]\nusd_per_dya = 1")
                .starts_with("tiers.pro.usd_per_dya: unknown field `usd_per_dya`")
        );
        assert!(err("bogus = 1").starts_with("bogus: unknown field `bogus`"));
        assert!(err("time_zone = \"Mars/Olympus\"").starts_with("time_zone: "));
        assert!(err("default_tier = \"gold\"").starts_with("default_tier: no tier named `gold`"));
        assert!(err("unknown_model = \"default_cost\"").starts_with("default_price: "));
        assert!(err("unknown_model = \"maybe\"").starts_with("unknown_model: "));
        assert!(
            err("[tiers.free]\nrequests_per_minute = 0")
                .starts_with("tiers.free.requests_per_minute")
        );
        assert!(
            err("[tiers.free]\nrequests_per_day = -1").starts_with("tiers.free.requests_per_day")
        );
        assert!(
            err("[global]\nusd_per_day = -5")
                .starts_with("global.usd_per_day: amount `-5` is negative")
        );
        assert!(err("reservation_ttl_seconds = 0").starts_with("reservation_ttl_seconds"));
        assert!(err("[prices.\"bad name\"]\ninput = 1\noutput = 1").starts_with("prices.bad name"));
        assert!(matches!(load("= nope"), Err(ConfigError::Syntax(_))));
        assert!(
            err("[server]\nlisten = \"nowhere\"")
                .starts_with("server.listen: `nowhere` is not an address")
        );
        assert!(
            err("[server]\non_store_error = \"panic\"")
                .starts_with("server.on_store_error: unknown variant")
        );
    }

    #[test]
    fn tenant_rules_are_validated_and_resolved_per_tenant() {
        let (_, policy) = load("").unwrap();
        let tier = |t: &str| TierName::parse(t).unwrap();
        assert_eq!(
            policy.tenant_rules.allowed_tiers,
            vec![tier("free"), tier("pro")]
        );
        assert_eq!(policy.tenant_rules.share_of_global_ppm, Some(250_000));
        assert_eq!(policy.tenant_rules.max_tracked_subjects, Some(100_000));
        let (_, policy) = load(
            "[tenant]\nmax_share_of_global = \"unlimited\"\n[tenants.acme]\nallowed_tiers = [\"enterprise\"]\nmax_share_of_global = 0.5\n",
        )
        .unwrap();
        let acme = policy.tenant_rules(&"acme".parse().unwrap());
        assert_eq!(acme.allowed_tiers, vec![tier("enterprise")]);
        assert_eq!(acme.share_of_global_ppm, Some(500_000));
        assert_eq!(acme.max_tracked_subjects, Some(100_000));
        let other = policy.tenant_rules(&"other".parse().unwrap());
        assert_eq!(other.share_of_global_ppm, None);
        assert_eq!(
            err("[tenant]\nallowed_tiers = [\"gold\"]"),
            "tenant.allowed_tiers[0]: no tier named `gold` is configured"
        );
        assert!(
            err("[tenant]\nmax_share_of_global = 1.5").starts_with("tenant.max_share_of_global")
        );
        assert!(err("[tenant]\nmax_share_of_global = 0").starts_with("tenant.max_share_of_global"));
        assert!(
            err("[tenants.acme]\nmax_tracked_subjects = 0")
                .starts_with("tenants.acme.max_tracked_subjects")
        );
        assert!(err("[tenants.\"bad id\"]").starts_with("tenants.bad id"));
        assert!(err("[tenants.acme]\nbogus = 1").starts_with("tenants.acme.bogus"));
        assert!(
            err("large_reservation_max_ttl_seconds = 100000")
                .starts_with("large_reservation_max_ttl_seconds")
        );
        assert!(err("max_record_cost_usd = 0").starts_with("max_record_cost_usd"));
        assert!(err("max_record_tokens = 0").starts_with("max_record_tokens"));
    }

    #[test]
    fn price_overrides_apply() {
        let (_, policy) =
            load("[prices.\"gpt-4o\"]\ninput = \"1\"\noutput = \"2\"\n[prices.mine]\ninput = 3\noutput = 4").unwrap();
        assert_eq!(
            policy.prices.lookup("gpt-4o-2024-08-06").unwrap().input,
            Money::from_usd(1).unwrap()
        );
        assert_eq!(
            policy.prices.lookup("mine").unwrap().output,
            Money::from_usd(4).unwrap()
        );
    }

    #[test]
    fn defaults_round_trip_through_serialization() {
        let config = Config::default();
        let text = toml::to_string(&config).unwrap();
        assert_eq!(Config::from_toml(&text).unwrap(), config);
    }
}
