//! `PriceTable`: USD per million input, cached-input and output tokens for each model.
//!
//! The built-in table (`data/prices.toml`) is compiled in; configuration adds or replaces
//! entries. Dated model names resolve to their base entry (`gpt-4o-2024-08-06` → `gpt-4o`).

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use serde::{Deserialize, Serialize};

use crate::ids::ModelName;
use crate::money::Money;

/// The built-in price list, as shipped.
pub const BUILTIN_PRICES_TOML: &str = include_str!("../data/prices.toml");

/// The price of one model, in USD per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: Money,
    /// Defaults to `input` when the provider gives no cache discount.
    #[serde(default)]
    pub cached_input: Option<Money>,
    pub output: Money,
}

impl Price {
    pub fn cached_input(&self) -> Money {
        self.cached_input.unwrap_or(self.input)
    }

    /// The cost of one call. `input_tokens` counts all prompt tokens, `cached_input_tokens`
    /// the part of them served from the cache (at most `input_tokens`). Rounded up to a
    /// micro-dollar; `None` only on overflow.
    pub fn cost(&self, tokens: Tokens) -> Option<Money> {
        let cached = tokens.cached_input.min(tokens.input);
        let uncached = tokens.input - cached;
        // Sum the exact products first, then round up once.
        let exact: i128 = (uncached as i128) * (self.input.micros() as i128)
            + (cached as i128) * (self.cached_input().micros() as i128)
            + (tokens.output as i128) * (self.output.micros() as i128);
        let micros = (exact + 999_999).div_euclid(1_000_000);
        i64::try_from(micros).ok().map(Money::from_micros)
    }
}

/// The price of last resort for a call on a model without a price when no `default_price`
/// is configured: as dear as the dearest models of the built-in table (USD 15 per million
/// input tokens, 75 per million output tokens), so such a call is never undercounted.
pub const CONSERVATIVE_PRICE: Price = Price {
    input: Money::from_micros(15_000_000),
    cached_input: None,
    output: Money::from_micros(75_000_000),
};

/// Token counts of one call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tokens {
    /// All prompt tokens, cached ones included.
    pub input: u64,
    /// The part of `input` read from the provider's prompt cache.
    pub cached_input: u64,
    pub output: u64,
}

impl Tokens {
    /// Tokens counted against token limits: prompt plus completion.
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
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

/// How a model's price was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priced {
    /// A table entry (exact or dated name).
    Listed(Price),
    /// Unknown model, priced by the `default_cost` policy.
    Default(Price),
    /// Unknown model under the `free` policy.
    Free,
}

impl Priced {
    pub fn cost(&self, tokens: Tokens) -> Option<Money> {
        match self {
            Priced::Listed(p) | Priced::Default(p) => p.cost(tokens),
            Priced::Free => Some(Money::ZERO),
        }
    }
}

/// Model prices with dated-name resolution and the unknown-model policy.
#[derive(Clone, Debug)]
pub struct PriceTable {
    models: HashMap<String, Price>,
    unknown: UnknownModelPolicy,
    default_price: Option<Price>,
}

impl PriceTable {
    /// The built-in table, denying unknown models.
    pub fn builtin() -> PriceTable {
        let file: PriceFile =
            toml::from_str(BUILTIN_PRICES_TOML).expect("the built-in price table is valid TOML");
        PriceTable {
            models: file.models,
            unknown: UnknownModelPolicy::Deny,
            default_price: None,
        }
    }

    /// Adds or replaces entries.
    pub fn with_overrides(mut self, overrides: impl IntoIterator<Item = (String, Price)>) -> Self {
        self.models.extend(overrides);
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

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The entries, sorted by name.
    pub fn entries(&self) -> Vec<(&str, &Price)> {
        let mut v: Vec<_> = self.models.iter().map(|(k, v)| (k.as_str(), v)).collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    /// The table entry for a model name, resolving dated names and `provider/` prefixes.
    pub fn lookup(&self, model: &str) -> Option<&Price> {
        if let Some(p) = self.models.get(model) {
            return Some(p);
        }
        let name = model.rsplit('/').next().unwrap_or(model);
        if name.len() != model.len()
            && let Some(p) = self.models.get(name)
        {
            return Some(p);
        }
        let base = strip_version_suffix(name)?;
        self.models.get(base)
    }

    /// The price of a call on a model without a price that already happened (a direct
    /// record, which is never refused): `default_price` when configured, else
    /// [`CONSERVATIVE_PRICE`].
    pub fn fallback(&self) -> Price {
        self.default_price.unwrap_or(CONSERVATIVE_PRICE)
    }

    /// The price to charge for a model, or `None` when the policy is `deny`.
    pub fn price(&self, model: &ModelName) -> Option<Priced> {
        if let Some(p) = self.lookup(model.as_str()) {
            return Some(Priced::Listed(*p));
        }
        match self.unknown {
            UnknownModelPolicy::Deny => None,
            UnknownModelPolicy::Free => Some(Priced::Free),
            UnknownModelPolicy::DefaultCost => self.default_price.map(Priced::Default),
        }
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
            ("mistral-large-latest", "mistral-large"),
            ("openai/gpt-4.1", "gpt-4.1"),
            ("models/gemini-2.5-flash", "gemini-2.5-flash"),
        ];
        for (dated, base) in cases {
            assert_eq!(t.lookup(dated), t.lookup(base), "{dated}");
            assert!(t.lookup(dated).is_some(), "{dated}");
        }
        // A different model is not a dated name of a known one.
        for unknown in [
            "gpt-4o-foo",
            "claude-sonnet-4-6",
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
            input: 1000,
            cached_input: 400,
            output: 500,
        };
        assert_eq!(p.cost(tokens), Some(Money::from_micros(7000)));
        // One token each: 2.5 + 10 = 12.5 micro-dollars, charged 13.
        let one = Tokens {
            input: 1,
            cached_input: 0,
            output: 1,
        };
        assert_eq!(p.cost(one), Some(Money::from_micros(13)));
        // Cached tokens beyond the input are capped at the input.
        let odd = Tokens {
            input: 10,
            cached_input: 50,
            output: 0,
        };
        assert_eq!(
            p.cost(odd),
            p.cost(Tokens {
                input: 10,
                cached_input: 10,
                output: 0
            })
        );
        let huge = Tokens {
            input: u64::MAX,
            cached_input: 0,
            output: u64::MAX,
        };
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
        let p = Price {
            input: Money::from_micros(1_000_000),
            cached_input: None,
            output: Money::ZERO,
        };
        let dflt = t.with_unknown_policy(UnknownModelPolicy::DefaultCost, Some(p));
        assert_eq!(dflt.price(&model("mystery")), Some(Priced::Default(p)));
        assert!(matches!(
            dflt.price(&model("gpt-4o")),
            Some(Priced::Listed(_))
        ));
    }

    #[test]
    fn overrides_replace_and_add() {
        let p = Price {
            input: Money::from_micros(1),
            cached_input: None,
            output: Money::from_micros(2),
        };
        let t = PriceTable::builtin().with_overrides([("gpt-4o".into(), p), ("mine".into(), p)]);
        assert_eq!(t.lookup("gpt-4o-2024-08-06"), Some(&p));
        assert_eq!(t.lookup("mine"), Some(&p));
    }
}
