//! `PriceTable`: what each model costs, per token kind, and where that price came from.
//!
//! The built-in catalog (`data/catalog.tsv`) is converted by `scripts/convert-prices.py` from
//! a vendored snapshot of LiteLLM's price list (`data/litellm/`) and compiled in; it is never
//! fetched at run time. Names the catalog lacks are filled from the hand-kept
//! `data/prices.toml`. Configuration adds or replaces entries (a config price beats the
//! catalog), and a tenant's overrides, set through the admin API, beat both. Dated model names
//! resolve to their base entry (`gpt-4o-2024-08-06` → `gpt-4o`).
//!
//! # Units
//! Token prices are [`Money`] per million tokens: integer micro-USD per million tokens, which
//! is pico-USD (1e-12 USD) per token, so every published per-token price is held exactly.
//! Per-request and per-image prices are [`Money`] per unit (micro-USD). A call's cost is the
//! exact sum of its parts in pico-USD, rounded up to the micro-dollar once.

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::ids::{ModelName, TenantId};
use crate::money::Money;

/// The hand-kept price list: the names it has that the catalog lacks are built in too.
pub const BUILTIN_PRICES_TOML: &str = include_str!("../data/prices.toml");

/// The catalog, as converted from the vendored LiteLLM snapshot.
pub const CATALOG_TSV: &str = include_str!("../data/catalog.tsv");

/// Where the catalog's prices come from, as shown with a catalog price.
pub const CATALOG_SNAPSHOT: &str = "litellm 1.110.2 (snapshot 2026-12-03)";

/// Pico-USD per micro-dollar.
const PICOS_PER_MICRO: i128 = 1_000_000;

/// Parts per million: a multiplier of 1.
pub const PPM_ONE: u64 = 1_000_000;

/// Prices for prompts above a number of tokens (`*_above_200k_tokens` and the like). For a
/// call whose prompt (`input` tokens, cached and cache-written ones included) is larger than
/// `above_tokens`, these replace the base prices; a kind without a tier price keeps the base
/// price the model lists for it, else is charged at the tier's input price.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongContext {
    pub above_tokens: u64,
    pub input: Money,
    pub output: Money,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<Money>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write: Option<Money>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h: Option<Money>,
}

/// The price of one model. Token prices are USD per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: Money,
    /// Prompt tokens read from the cache. Defaults to `input` when the provider gives no cache
    /// discount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<Money>,
    pub output: Money,
    /// Prompt tokens written to the cache (the 5-minute cache). Defaults to `input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write: Option<Money>,
    /// Prompt tokens written to the 1-hour cache. Defaults to `cache_write`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h: Option<Money>,
    /// Reasoning tokens, where a provider prices them apart from output. Defaults to
    /// `output` (reasoning tokens are output tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<Money>,
    /// USD per call, on top of the tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_request: Option<Money>,
    /// USD per input image. Carried and shown; usage records hold no image counts, so it is
    /// not charged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_image_input: Option<Money>,
    /// USD per generated image. Carried and shown, not charged (as `per_image_input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_image_output: Option<Money>,
    /// The long-context tier, if the model has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_context: Option<LongContext>,
}

/// The per-million-token rates that apply to one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rates {
    input: Money,
    cached_input: Money,
    cache_write: Money,
    cache_write_1h: Money,
    output: Money,
    reasoning: Money,
}

impl Price {
    /// A price of input and output tokens only.
    pub const fn simple(input: Money, output: Money) -> Price {
        Price {
            input,
            cached_input: None,
            output,
            cache_write: None,
            cache_write_1h: None,
            reasoning: None,
            per_request: None,
            per_image_input: None,
            per_image_output: None,
            long_context: None,
        }
    }

    pub fn cached_input(&self) -> Money {
        self.cached_input.unwrap_or(self.input)
    }

    /// The long-context tier's threshold if a prompt of `input` tokens is above it.
    pub fn tier_for(&self, input: u64) -> Option<u64> {
        self.long_context
            .filter(|lc| input > lc.above_tokens)
            .map(|lc| lc.above_tokens)
    }

    fn rates(&self, input_tokens: u64) -> Rates {
        let cached = self.cached_input();
        let write = self.cache_write.unwrap_or(self.input);
        let base = Rates {
            input: self.input,
            cached_input: cached,
            cache_write: write,
            cache_write_1h: self.cache_write_1h.unwrap_or(write),
            output: self.output,
            reasoning: self.reasoning.unwrap_or(self.output),
        };
        match self.long_context {
            Some(lc) if input_tokens > lc.above_tokens => {
                // A kind without a tier price: the base price where the model lists one,
                // else (as without a tier) the tier's input price.
                let write = lc.cache_write.or(self.cache_write).unwrap_or(lc.input);
                Rates {
                    input: lc.input,
                    cached_input: lc.cached_input.or(self.cached_input).unwrap_or(lc.input),
                    cache_write: write,
                    cache_write_1h: lc.cache_write_1h.or(self.cache_write_1h).unwrap_or(write),
                    output: lc.output,
                    // A separate reasoning price has no tier of its own: the tier's output
                    // price when reasoning is priced as output, else the base reasoning price.
                    reasoning: self.reasoning.unwrap_or(lc.output),
                }
            }
            _ => base,
        }
    }

    /// The exact cost of one call in pico-USD (1e-12 USD), before rounding; `None` only on
    /// overflow. See [`Tokens`] for how the kinds nest.
    pub fn picos(&self, tokens: Tokens) -> Option<i128> {
        let t = tokens.normalized();
        let r = self.rates(t.input);
        let plain = t.input - t.cached_input - t.cache_creation;
        let write_5m = t.cache_creation - t.cache_creation_1h;
        let other_output = t.output - t.reasoning;
        let part = |n: u64, rate: Money| (n as i128).checked_mul(rate.micros() as i128);
        let mut sum: i128 = self
            .per_request
            .map_or(0, |m| m.micros() as i128 * PICOS_PER_MICRO);
        for p in [
            part(plain, r.input),
            part(t.cached_input, r.cached_input),
            part(write_5m, r.cache_write),
            part(t.cache_creation_1h, r.cache_write_1h),
            part(other_output, r.output),
            part(t.reasoning, r.reasoning),
        ] {
            sum = sum.checked_add(p?)?;
        }
        Some(sum)
    }

    /// The cost of one call, rounded up to a micro-dollar once; `None` only on overflow.
    pub fn cost(&self, tokens: Tokens) -> Option<Money> {
        scaled_cost(self.picos(tokens)?, PPM_ONE)
    }
}

/// `picos × ppm / 10^6` pico-USD, rounded up to the micro-dollar once.
fn scaled_cost(picos: i128, ppm: u64) -> Option<Money> {
    let scaled = picos.checked_mul(ppm as i128)?;
    let denom = PICOS_PER_MICRO * PPM_ONE as i128;
    let micros = scaled.checked_add(denom - 1)?.div_euclid(denom);
    i64::try_from(micros).ok().map(Money::from_micros)
}

/// The price of last resort for a call on a model without a price when no `default_price`
/// is configured: USD 15 per million input tokens, 75 per million output tokens, so such a
/// call is never undercounted.
pub const CONSERVATIVE_PRICE: Price = Price::simple(
    Money::from_micros(15_000_000),
    Money::from_micros(75_000_000),
);

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Token counts of one call. The kinds nest: `cached_input` and `cache_creation` are parts of
/// `input` (a prompt token is read from the cache, written to it, or neither);
/// `cache_creation_1h` is the part of `cache_creation` written to the 1-hour cache; and
/// `reasoning` is the part of `output` spent reasoning. Parts larger than their whole are
/// capped, in that order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tokens {
    /// All prompt tokens, cached and cache-written ones included.
    pub input: u64,
    /// The part of `input` read from the provider's prompt cache.
    pub cached_input: u64,
    pub output: u64,
    /// The part of `input` written to the provider's prompt cache (5-minute and 1-hour).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_creation: u64,
    /// The part of `cache_creation` written to the 1-hour cache.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_creation_1h: u64,
    /// The part of `output` spent on reasoning.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reasoning: u64,
}

impl Tokens {
    /// Input and output tokens, nothing cached, written or reasoned.
    pub const fn new(input: u64, output: u64) -> Tokens {
        Tokens {
            input,
            cached_input: 0,
            output,
            cache_creation: 0,
            cache_creation_1h: 0,
            reasoning: 0,
        }
    }

    /// Tokens counted against token limits: prompt plus completion.
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }

    /// The counts with each part capped at its whole.
    pub fn normalized(&self) -> Tokens {
        let cached_input = self.cached_input.min(self.input);
        let cache_creation = self.cache_creation.min(self.input - cached_input);
        Tokens {
            input: self.input,
            cached_input,
            output: self.output,
            cache_creation,
            cache_creation_1h: self.cache_creation_1h.min(cache_creation),
            reasoning: self.reasoning.min(self.output),
        }
    }
}

/// What to do with a model that has no price.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownModelPolicy {
    /// Refuse the call (the default): an unpriced model is never counted as free by accident.
    #[default]
    Deny,
    /// Charge the configured `default_price`.
    DefaultCost,
    /// Count the tokens but charge nothing.
    Free,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    models: HashMap<String, Price>,
}

/// Where a listed price came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The built-in catalog.
    Catalog,
    /// The configuration's `[prices]`.
    Config,
    /// The tenant's price overrides (admin API).
    TenantOverride,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Catalog => "catalog",
            Source::Config => "config",
            Source::TenantOverride => "tenant_override",
        }
    }
}

/// A table entry: the price, where it came from and, for a catalog price, the provider it
/// was listed under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub price: Price,
    pub source: Source,
    pub provider: Option<&'static str>,
}

/// A tenant's negotiated prices: explicit prices per model (beating the configured and
/// catalog prices), and a multiplier, in parts per million, on every other listed price
/// (`850000` is a 15% discount). Unknown-model fallbacks are never scaled.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPrices {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier_ppm: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, Price>,
}

/// The largest tenant multiplier: 1000x.
pub const MAX_MULTIPLIER_PPM: u64 = 1_000 * PPM_ONE;

/// A price found for a model: the entry, the tenant multiplier applied to it (parts per
/// million) and how to name its source on a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quote {
    pub price: Price,
    /// Where the price was found; `TenantOverride` also when a tenant multiplier scaled it.
    pub source: Source,
    pub provider: Option<&'static str>,
    pub multiplier_ppm: u64,
}

impl Quote {
    /// The cost of one call at this quote, rounded up to a micro-dollar once.
    pub fn cost(&self, tokens: Tokens) -> Option<Money> {
        scaled_cost(self.price.picos(tokens)?, self.multiplier_ppm)
    }
}

/// How a model's price was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priced {
    /// A table entry (exact or dated name), perhaps a tenant's.
    Listed(Quote),
    /// Unknown model, priced by the `default_cost` policy.
    Default(Price),
    /// Unknown model under the `free` policy.
    Free,
}

impl Priced {
    pub fn cost(&self, tokens: Tokens) -> Option<Money> {
        match self {
            Priced::Listed(q) => q.cost(tokens),
            Priced::Default(p) => p.cost(tokens),
            Priced::Free => Some(Money::ZERO),
        }
    }
}

/// Why a catalog line could not be read (a defect of the build, caught by its tests).
fn parse_catalog(text: &'static str) -> Result<Vec<(&'static str, Entry)>, String> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().ok_or("empty catalog")?.split('\t').collect();
    const COLUMNS: [&str; 17] = [
        "model",
        "provider",
        "input",
        "output",
        "cache_read",
        "cache_write",
        "cache_write_1h",
        "reasoning",
        "per_request",
        "per_image_input",
        "per_image_output",
        "tier_above",
        "tier_input",
        "tier_output",
        "tier_cache_read",
        "tier_cache_write",
        "tier_cache_write_1h",
    ];
    if header != COLUMNS {
        return Err(format!("unexpected catalog columns {header:?}"));
    }
    let mut out = Vec::new();
    for (n, line) in lines.enumerate() {
        let f: Vec<&'static str> = line.split('\t').collect();
        if f.len() != COLUMNS.len() {
            return Err(format!("catalog line {}: {} fields", n + 2, f.len()));
        }
        let num = |i: usize| -> Result<Option<i64>, String> {
            if f[i].is_empty() {
                return Ok(None);
            }
            f[i].parse::<i64>()
                .map(Some)
                .map_err(|_| format!("catalog line {}: bad {}", n + 2, COLUMNS[i]))
        };
        let money = |i: usize| num(i).map(|v| v.map(Money::from_micros));
        let long_context = match num(11)? {
            None => None,
            Some(above) => Some(LongContext {
                above_tokens: above as u64,
                input: money(12)?.ok_or("a tier without an input price")?,
                output: money(13)?.ok_or("a tier without an output price")?,
                cached_input: money(14)?,
                cache_write: money(15)?,
                cache_write_1h: money(16)?,
            }),
        };
        let price = Price {
            input: money(2)?.unwrap_or(Money::ZERO),
            output: money(3)?.unwrap_or(Money::ZERO),
            cached_input: money(4)?,
            cache_write: money(5)?,
            cache_write_1h: money(6)?,
            reasoning: money(7)?,
            per_request: money(8)?,
            per_image_input: money(9)?,
            per_image_output: money(10)?,
            long_context,
        };
        out.push((
            f[0],
            Entry {
                price,
                source: Source::Catalog,
                provider: Some(f[1]),
            },
        ));
    }
    Ok(out)
}

fn builtin_entries() -> Arc<HashMap<String, Entry>> {
    static BUILTIN: OnceLock<Arc<HashMap<String, Entry>>> = OnceLock::new();
    BUILTIN
        .get_or_init(|| {
            let mut models: HashMap<String, Entry> = parse_catalog(CATALOG_TSV)
                .expect("the built-in catalog is valid")
                .into_iter()
                .map(|(k, e)| (k.to_owned(), e))
                .collect();
            for (name, price) in small_table() {
                models.entry(name).or_insert(Entry {
                    price,
                    source: Source::Catalog,
                    provider: None,
                });
            }
            Arc::new(models)
        })
        .clone()
}

fn small_table() -> HashMap<String, Price> {
    let file: PriceFile =
        toml::from_str(BUILTIN_PRICES_TOML).expect("the built-in price table is valid TOML");
    file.models
}

/// Model prices with dated-name resolution, the unknown-model policy and tenant overrides.
///
/// A name is looked up in the configured prices first, then in the catalog, each with the
/// same name rules, so a configured `gpt-4o` also prices `gpt-4o-2024-08-06` even though the
/// catalog lists that dated name.
#[derive(Clone, Debug)]
pub struct PriceTable {
    /// The catalog, shared by every clone.
    catalog: Arc<HashMap<String, Entry>>,
    config: HashMap<String, Entry>,
    unknown: UnknownModelPolicy,
    default_price: Option<Price>,
}

impl PriceTable {
    /// The built-in catalog (with the hand-kept names it lacks), denying unknown models.
    pub fn builtin() -> PriceTable {
        PriceTable {
            catalog: builtin_entries(),
            config: HashMap::default(),
            unknown: UnknownModelPolicy::Deny,
            default_price: None,
        }
    }

    /// The hand-kept table alone (`data/prices.toml`, 43 models): for comparisons.
    pub fn small() -> PriceTable {
        let models = small_table()
            .into_iter()
            .map(|(k, price)| {
                let e = Entry {
                    price,
                    source: Source::Catalog,
                    provider: None,
                };
                (k, e)
            })
            .collect();
        PriceTable {
            catalog: Arc::new(models),
            config: HashMap::default(),
            unknown: UnknownModelPolicy::Deny,
            default_price: None,
        }
    }

    /// Adds or replaces configured prices (source `config`).
    pub fn with_overrides(mut self, overrides: impl IntoIterator<Item = (String, Price)>) -> Self {
        self.config.extend(overrides.into_iter().map(|(k, price)| {
            let e = Entry {
                price,
                source: Source::Config,
                provider: None,
            };
            (k, e)
        }));
        self
    }

    /// Sets the unknown-model policy; `default_cost` needs a price.
    pub fn with_unknown_policy(
        mut self,
        policy: UnknownModelPolicy,
        default: Option<Price>,
    ) -> Self {
        self.unknown = policy;
        self.default_price = default;
        self
    }

    pub fn unknown_policy(&self) -> UnknownModelPolicy {
        self.unknown
    }

    /// The price of unknown models under the `default_cost` policy.
    pub fn default_price(&self) -> Option<&Price> {
        self.default_price.as_ref()
    }

    /// The number of names priced: configured and catalog, each counted once.
    pub fn len(&self) -> usize {
        self.catalog.len()
            + self
                .config
                .keys()
                .filter(|k| !self.catalog.contains_key(*k))
                .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries, sorted by name; a configured price hides the catalog's of that name.
    pub fn entries(&self) -> Vec<(&str, &Entry)> {
        let mut v: Vec<_> = self
            .config
            .iter()
            .chain(
                self.catalog
                    .iter()
                    .filter(|(k, _)| !self.config.contains_key(*k)),
            )
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    /// The table entry for a model name, resolving dated names and `provider/` prefixes:
    /// the configured prices first, then the catalog.
    pub fn lookup_entry(&self, model: &str) -> Option<&Entry> {
        if self.config.is_empty() {
            return resolve(&*self.catalog, model);
        }
        resolve(&self.config, model).or_else(|| resolve(&*self.catalog, model))
    }

    /// The table price for a model name, resolving dated names and `provider/` prefixes.
    pub fn lookup(&self, model: &str) -> Option<&Price> {
        self.lookup_entry(model).map(|e| &e.price)
    }

    /// The price of a call on a model without a price that already happened (a direct
    /// record, which is never refused): `default_price` when configured, else
    /// [`CONSERVATIVE_PRICE`].
    pub fn fallback(&self) -> Price {
        self.default_price.unwrap_or(CONSERVATIVE_PRICE)
    }

    /// The listed price of a model for a tenant with these overrides: the tenant's own
    /// price, else the table's scaled by the tenant's multiplier.
    pub fn quote(&self, model: &str, tenant: Option<&TenantPrices>) -> Option<Quote> {
        if let Some(t) = tenant
            && let Some(price) = resolve(&t.models, model)
        {
            return Some(Quote {
                price: *price,
                source: Source::TenantOverride,
                provider: None,
                multiplier_ppm: PPM_ONE,
            });
        }
        let e = self.lookup_entry(model)?;
        let multiplier = tenant.and_then(|t| t.multiplier_ppm);
        Some(Quote {
            price: e.price,
            source: if multiplier.is_some() {
                Source::TenantOverride
            } else {
                e.source
            },
            provider: e.provider,
            multiplier_ppm: multiplier.unwrap_or(PPM_ONE),
        })
    }

    /// The price to charge for a model, or `None` when the policy is `deny`.
    pub fn price(&self, model: &ModelName) -> Option<Priced> {
        self.price_for(model, None)
    }

    /// [`PriceTable::price`] for a tenant with these overrides.
    pub fn price_for(&self, model: &ModelName, tenant: Option<&TenantPrices>) -> Option<Priced> {
        if let Some(q) = self.quote(model.as_str(), tenant) {
            return Some(Priced::Listed(q));
        }
        match self.unknown {
            UnknownModelPolicy::Deny => None,
            UnknownModelPolicy::Free => Some(Priced::Free),
            UnknownModelPolicy::DefaultCost => self.default_price.map(Priced::Default),
        }
    }
}

/// Tenant overrides of prices, by tenant.
pub type TenantPriceMap = HashMap<TenantId, TenantPrices>;

/// Finds a model in a map keyed by names: the exact name, then the part after the last `/`,
/// then that part without a date or version suffix.
fn resolve<'a, M: PriceMap>(models: &'a M, model: &str) -> Option<&'a M::Value> {
    if let Some(p) = models.get_name(model) {
        return Some(p);
    }
    let name = model.rsplit('/').next().unwrap_or(model);
    if name.len() != model.len()
        && let Some(p) = models.get_name(name)
    {
        return Some(p);
    }
    let base = strip_version_suffix(name)?;
    models.get_name(base)
}

/// A map from model names, as [`resolve`] reads it.
trait PriceMap {
    type Value;
    fn get_name(&self, name: &str) -> Option<&Self::Value>;
}

impl<V> PriceMap for HashMap<String, V> {
    type Value = V;
    fn get_name(&self, name: &str) -> Option<&V> {
        self.get(name)
    }
}

impl<V> PriceMap for BTreeMap<String, V> {
    type Value = V;
    fn get_name(&self, name: &str) -> Option<&V> {
        self.get(name)
    }
}

/// `gpt-4o-2024-08-06` → `gpt-4o`; `claude-3-5-sonnet-20241022` → `claude-3-5-sonnet`;
/// `mistral-large-2411` and `mistral-large-latest` → `mistral-large`;
/// `claude-3-5-sonnet@20240620` → `claude-3-5-sonnet`. Anything else is not a dated name:
/// `gpt-4o-foo` does not resolve, so an unknown variant is never priced as its neighbour.
fn strip_version_suffix(name: &str) -> Option<&str> {
    let all_digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    // YYYY-MM-DD: the last 10 characters, after a separator.
    if name.len() > 11 {
        let (head, tail) = name.split_at(name.len() - 10);
        let t = tail.as_bytes();
        if (head.ends_with('-') || head.ends_with('@'))
            && all_digits(&tail[..4], 4)
            && t[4] == b'-'
            && all_digits(&tail[5..7], 2)
            && t[7] == b'-'
            && all_digits(&tail[8..], 2)
        {
            return Some(&head[..head.len() - 1]);
        }
    }
    let i = name.rfind(['-', '@'])?;
    let (head, tail) = (&name[..i], &name[i + 1..]);
    if head.is_empty() {
        return None;
    }
    // YYYYMMDD, YYMM or MMDD, or `latest`.
    if all_digits(tail, 8) || all_digits(tail, 4) || tail == "latest" {
        return Some(head);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(s: &str) -> ModelName {
        ModelName::parse(s).unwrap()
    }

    #[test]
    fn builtin_table_covers_the_four_providers() {
        let t = PriceTable::builtin();
        for m in [
            "gpt-4o",
            "gpt-5",
            "claude-sonnet-4-5",
            "gemini-2.5-pro",
            "mistral-large",
        ] {
            assert!(t.lookup(m).is_some(), "{m} missing");
        }
        assert!(t.len() > 30);
    }

    #[test]
    fn dated_names_resolve_to_the_base_model() {
        let t = PriceTable::builtin();
        let cases = [
            ("gpt-4o-2024-08-06", "gpt-4o"),
            ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
            ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
            ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
            ("claude-3-5-sonnet@20240620", "claude-3-5-sonnet"),
            ("mistral-large-2411", "mistral-large"),
            ("openai/gpt-4.1", "gpt-4.1"),
            ("models/gemini-2.5-flash", "gemini-2.5-flash"),
        ];
        for (dated, base) in cases {
            assert_eq!(t.lookup(dated), t.lookup(base), "{dated}");
            assert!(t.lookup(dated).is_some(), "{dated}");
        }
        // A name the catalog lists itself is priced as listed, not as its base name.
        assert_eq!(
            t.lookup("mistral-large-latest").map(|p| p.input),
            Some(Money::from_micros(500_000))
        );
        // A different model is not a dated name of a known one.
        for unknown in [
            "gpt-4o-foo",
            "claude-sonnet-9-9",
            "gpt-4o-20240",
            "my-model",
            "-2024-08-06",
        ] {
            assert_eq!(t.lookup(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn cost_uses_the_three_prices_and_rounds_up_once() {
        let t = PriceTable::builtin();
        let p = *t.lookup("gpt-4o").unwrap();
        // 1000 input of which 400 cached, 500 output:
        // 600 * 2.50 + 400 * 1.25 + 500 * 10.00 = 1500 + 500 + 5000 = 7000 USD per million tokens
        // = 0.007 USD.
        let tokens = Tokens {
            cached_input: 400,
            ..Tokens::new(1000, 500)
        };
        assert_eq!(p.cost(tokens), Some(Money::from_micros(7000)));
        // One token each: 2.5 + 10 = 12.5 micro-dollars, charged 13.
        let one = Tokens::new(1, 1);
        assert_eq!(p.cost(one), Some(Money::from_micros(13)));
        // Cached tokens beyond the input are capped at the input.
        let odd = Tokens {
            cached_input: 50,
            ..Tokens::new(10, 0)
        };
        assert_eq!(
            p.cost(odd),
            p.cost(Tokens {
                cached_input: 10,
                ..Tokens::new(10, 0)
            })
        );
        let huge = Tokens::new(u64::MAX, u64::MAX);
        assert_eq!(p.cost(huge), None);
    }

    #[test]
    fn unknown_model_policies() {
        let t = PriceTable::builtin();
        assert_eq!(t.price(&model("mystery")), None);
        let free = t
            .clone()
            .with_unknown_policy(UnknownModelPolicy::Free, None);
        assert_eq!(free.price(&model("mystery")), Some(Priced::Free));
        let p = Price::simple(Money::from_micros(1_000_000), Money::ZERO);
        let dflt = t.with_unknown_policy(UnknownModelPolicy::DefaultCost, Some(p));
        assert_eq!(dflt.price(&model("mystery")), Some(Priced::Default(p)));
        assert!(matches!(
            dflt.price(&model("gpt-4o")),
            Some(Priced::Listed(Quote {
                source: Source::Catalog,
                ..
            }))
        ));
    }

    #[test]
    fn overrides_replace_and_add() {
        let p = Price::simple(Money::from_micros(1), Money::from_micros(2));
        let t = PriceTable::builtin().with_overrides([("gpt-4o".into(), p), ("mine".into(), p)]);
        assert_eq!(t.lookup("gpt-4o-2024-08-06"), Some(&p));
        assert_eq!(t.lookup("mine"), Some(&p));
    }

    #[test]
    fn config_beats_the_catalog_and_a_tenant_override_beats_both() {
        let catalog = PriceTable::builtin();
        let listed = *catalog.lookup("gpt-4o").unwrap();
        let cfg = Price::simple(Money::from_micros(1_000_000), Money::from_micros(2_000_000));
        let own = Price::simple(Money::from_micros(500_000), Money::from_micros(700_000));
        let t = catalog.with_overrides([("gpt-4o".to_owned(), cfg)]);
        let tokens = Tokens::new(1_000_000, 1_000_000);

        let q = t.quote("gpt-4o-2024-08-06", None).unwrap();
        assert_eq!((q.price, q.source), (cfg, Source::Config));
        assert_eq!(q.cost(tokens), Some(Money::from_micros(3_000_000)));
        // A model without a configured price keeps the catalog's.
        let q = t.quote("gpt-4o-mini", None).unwrap();
        assert_eq!(q.source, Source::Catalog);
        assert_eq!(q.provider, Some("openai"));
        assert_ne!(q.price, listed);

        let tenant = TenantPrices {
            multiplier_ppm: Some(800_000),
            models: BTreeMap::from([("gpt-4o".to_owned(), own)]),
        };
        // The tenant's own price beats the configured one, and is not scaled.
        let q = t.quote("gpt-4o", Some(&tenant)).unwrap();
        assert_eq!((q.price, q.source), (own, Source::TenantOverride));
        assert_eq!(q.cost(tokens), Some(Money::from_micros(1_200_000)));
        // Other models: the configured or catalog price times the multiplier.
        let mini = *t.lookup("gpt-4o-mini").unwrap();
        let q = t.quote("gpt-4o-mini", Some(&tenant)).unwrap();
        assert_eq!((q.price, q.source), (mini, Source::TenantOverride));
        let full = mini.cost(tokens).unwrap().micros();
        assert_eq!(q.cost(tokens), Some(Money::from_micros(full * 8 / 10)));
        // Unknown models are not priced by a tenant's multiplier.
        assert_eq!(t.quote("mystery", Some(&tenant)), None);
    }

    #[test]
    fn token_kinds_nest_and_are_priced_apart() {
        let p = Price {
            cached_input: Some(Money::from_micros(100_000)),
            cache_write: Some(Money::from_micros(1_250_000)),
            cache_write_1h: Some(Money::from_micros(2_000_000)),
            reasoning: Some(Money::from_micros(20_000_000)),
            per_request: Some(Money::from_micros(7)),
            ..Price::simple(
                Money::from_micros(1_000_000),
                Money::from_micros(10_000_000),
            )
        };
        let t = Tokens {
            input: 10_000,
            cached_input: 2_000,
            output: 1_000,
            cache_creation: 3_000,
            cache_creation_1h: 1_000,
            reasoning: 400,
        };
        // plain 5000 x 1 + cached 2000 x 0.1 + 5m 2000 x 1.25 + 1h 1000 x 2 + output 600 x 10
        // + reasoning 400 x 20 = 5000 + 200 + 2500 + 2000 + 6000 + 8000 = 23700 micro-USD,
        // plus 7 per request.
        assert_eq!(p.cost(t), Some(Money::from_micros(23_707)));
        // Parts larger than their whole are capped.
        let over = Tokens {
            input: 10,
            cached_input: 4,
            output: 5,
            cache_creation: 50,
            cache_creation_1h: 90,
            reasoning: 70,
        };
        assert_eq!(
            over.normalized(),
            Tokens {
                input: 10,
                cached_input: 4,
                output: 5,
                cache_creation: 6,
                cache_creation_1h: 6,
                reasoning: 5,
            }
        );
    }

    #[test]
    fn a_long_prompt_is_priced_at_the_long_context_tier() {
        let t = PriceTable::builtin();
        let p = *t.lookup("gemini-2.5-pro").unwrap();
        assert_eq!(p.tier_for(200_000), None);
        assert_eq!(p.tier_for(200_001), Some(200_000));
        // At the threshold: 200000 x 1.25 + 1000 x 10 = 260000 micro-USD.
        assert_eq!(
            p.cost(Tokens::new(200_000, 1_000)),
            Some(Money::from_micros(260_000))
        );
        // One token above: every token at 2.50 and 15: 200001 x 2.5 + 1000 x 15 = 515002.5.
        assert_eq!(
            p.cost(Tokens::new(200_001, 1_000)),
            Some(Money::from_micros(515_003))
        );
    }

    #[test]
    fn the_catalog_parses_and_covers_the_providers() {
        let entries = parse_catalog(CATALOG_TSV).unwrap();
        assert!(entries.len() > 1000, "{}", entries.len());
        let t = PriceTable::builtin();
        for (m, provider) in [
            ("gpt-4o", "openai"),
            ("o3", "openai"),
            ("claude-sonnet-4-5", "anthropic"),
            ("gemini/gemini-2.5-pro", "gemini"),
            ("mistral-large-latest", "mistral"),
            ("deepseek-chat", "deepseek"),
            ("xai/grok-4.20", "xai"),
            (
                "anthropic.claude-sonnet-4-5-20250929-v1:0",
                "bedrock_converse",
            ),
            (
                "vertex_ai/claude-sonnet-4-5@20250929",
                "vertex_ai-anthropic_models",
            ),
        ] {
            let e = t.lookup_entry(m).unwrap_or_else(|| panic!("{m} missing"));
            assert_eq!(e.provider, Some(provider), "{m}");
        }
        // The hand-kept names the catalog lacks are still priced.
        assert!(t.lookup("mistral-large").is_some());
        assert!(t.len() > PriceTable::small().len() + 1000);
    }
}
