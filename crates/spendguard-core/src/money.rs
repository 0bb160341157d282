//! `Money`: an amount of US dollars held as an integer number of micro-dollars.
//!
//! Decimal input (strings such as `"0.1"` or JSON numbers such as `0.1`) is parsed exactly:
//! `0.1 + 0.2` is exactly `0.3`. Digits past the sixth decimal round *up* to the next
//! micro-dollar, so a budget is never undercounted. Arithmetic is checked; an `f64` never
//! holds an amount.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Micro-dollars per dollar.
pub const MICROS_PER_USD: i64 = 1_000_000;

/// An amount of USD in micro-dollars (1e-6 USD).
///
/// Amounts parsed from input are never negative; deltas computed inside the ledger may be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i64);

/// Why a decimal amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount is empty")]
    Empty,
    #[error("amount `{0}` is not a decimal number of USD")]
    Invalid(String),
    #[error("amount `{0}` is negative")]
    Negative(String),
    #[error("amount `{0}` is too large")]
    Overflow(String),
}

impl Money {
    pub const ZERO: Money = Money(0);
    /// The largest amount: about 9.2 trillion USD.
    pub const MAX: Money = Money(i64::MAX);

    /// An amount from a number of micro-dollars.
    pub const fn from_micros(micros: i64) -> Money {
        Money(micros)
    }

    /// Whole dollars; `None` on overflow.
    pub const fn from_usd(usd: i64) -> Option<Money> {
        match usd.checked_mul(MICROS_PER_USD) {
            Some(m) => Some(Money(m)),
            None => None,
        }
    }

    pub const fn micros(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }

    pub fn checked_sub(self, other: Money) -> Option<Money> {
        self.0.checked_sub(other.0).map(Money)
    }

    /// Addition that clamps at [`Money::MAX`]: used for running totals, where a
    /// clamped total still denies everything, which is the safe direction.
    pub fn saturating_add(self, other: Money) -> Money {
        Money(self.0.saturating_add(other.0))
    }

    pub fn saturating_sub(self, other: Money) -> Money {
        Money(self.0.saturating_sub(other.0))
    }

    /// USD as a float, for display and JSON output only (never for state).
    pub fn as_usd_f64(self) -> f64 {
        // One correctly rounded division: below 10^15 micro-dollars (15 digits, a billion
        // USD) the shortest decimal form of the result is the amount with at most six
        // decimals.
        self.0 as f64 / MICROS_PER_USD as f64
    }

    /// `count` units at `price_per_million` USD per million units, rounded up to a micro-dollar.
    ///
    /// Exact: `count * price_micros / 1e6` computed in 128-bit integers.
    pub fn per_million(count: u64, price_per_million: Money) -> Option<Money> {
        let product = (count as i128).checked_mul(price_per_million.0 as i128)?;
        let micros = (product + 999_999).div_euclid(1_000_000);
        i64::try_from(micros).ok().map(Money)
    }

    /// Parses a non-negative decimal amount of USD, such as `12`, `0.30`, `1e-3` or `.5`.
    /// Digits beyond micro-dollars round up.
    pub fn parse_usd(input: &str) -> Result<Money, MoneyError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(MoneyError::Empty);
        }
        let invalid = || MoneyError::Invalid(input.to_owned());
        let overflow = || MoneyError::Overflow(input.to_owned());
        let (s, negative) = match s.as_bytes()[0] {
            b'-' => (&s[1..], true),
            b'+' => (&s[1..], false),
            _ => (s, false),
        };
        let (mantissa, exponent) = match s.find(['e', 'E']) {
            Some(i) => {
                let exp: i32 = s[i + 1..].parse().map_err(|_| invalid())?;
                (&s[..i], exp)
            }
            None => (s, 0),
        };
        let (int_part, frac_part) = match mantissa.find('.') {
            Some(i) => (&mantissa[..i], &mantissa[i + 1..]),
            None => (mantissa, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(invalid());
        }
        if !int_part.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(invalid());
        }
        // All digits, and where the decimal point sits once the exponent is applied.
        let digits = int_part.bytes().chain(frac_part.bytes()).map(|b| b - b'0');
        let point = int_part.len() as i64 + exponent as i64;
        // value = 0.d1 d2 d3 ... * 10^point; micros = value * 10^6.
        let scale = point + 6; // number of leading digits that form the integer micro count
        let mut micros: i128 = 0;
        let mut round_up = false;
        let mut all_zero = true;
        for (i, d) in digits.enumerate() {
            if d != 0 {
                all_zero = false;
            }
            if (i as i64) < scale {
                micros = micros
                    .checked_mul(10)
                    .and_then(|m| m.checked_add(d as i128))
                    .filter(|m| *m <= i64::MAX as i128)
                    .ok_or_else(overflow)?;
            } else if d != 0 {
                round_up = true;
            }
        }
        // Digits that were not written but sit before the decimal point (e.g. `5e3`).
        let written = (int_part.len() + frac_part.len()) as i64;
        if scale > written && micros != 0 {
            let missing = scale - written;
            if missing > 38 {
                return Err(overflow());
            }
            micros = micros
                .checked_mul(10i128.pow(missing as u32))
                .filter(|m| *m <= i64::MAX as i128)
                .ok_or_else(overflow)?;
        }
        if round_up {
            micros += 1;
            if micros > i64::MAX as i128 {
                return Err(overflow());
            }
        }
        if negative && !all_zero {
            return Err(MoneyError::Negative(input.to_owned()));
        }
        Ok(Money(micros as i64))
    }
}

impl FromStr for Money {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Money::parse_usd(s)
    }
}

/// Shown as USD with exactly six decimals: `1.500000`.
impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let usd = abs / MICROS_PER_USD as u64;
        let micros = abs % MICROS_PER_USD as u64;
        write!(f, "{sign}{usd}.{micros:06}")
    }
}

/// Serialized as a JSON number of USD with at most six decimals; from 1,000,000,000 USD
/// (10^15 micro-dollars, 16 digits) up, where a float's shortest form no longer reads back
/// as every micro-dollar, as a decimal string, so that every amount reads back exactly (the
/// spool and the journal rely on it).
impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0.unsigned_abs() < 1_000_000_000_000_000 {
            serializer.serialize_f64(self.as_usd_f64())
        } else {
            serializer.collect_str(self)
        }
    }
}

/// Deserialized from a decimal string or a number. A float is read through its shortest
/// round-trip decimal form, so `0.1` is exactly 100,000 micro-dollars.
impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MoneyVisitor;
        impl Visitor<'_> for MoneyVisitor {
            type Value = Money;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative USD amount, as a number or a decimal string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Money, E> {
                Money::parse_usd(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Money, E> {
                i64::try_from(v)
                    .ok()
                    .and_then(Money::from_usd)
                    .ok_or_else(|| E::custom(MoneyError::Overflow(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Money, E> {
                if v < 0 {
                    return Err(E::custom(MoneyError::Negative(v.to_string())));
                }
                self.visit_u64(v as u64)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Money, E> {
                if !v.is_finite() {
                    return Err(E::custom(MoneyError::Invalid(v.to_string())));
                }
                // `{}` prints the shortest decimal that reads back as the same f64.
                Money::parse_usd(&v.to_string()).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(MoneyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn usd(s: &str) -> Money {
        Money::parse_usd(s).unwrap()
    }

    #[test]
    fn parses_decimals_exactly() {
        assert_eq!(usd("0.1").checked_add(usd("0.2")), Some(usd("0.3")));
        assert_eq!(usd("12").micros(), 12_000_000);
        assert_eq!(usd("0.000001").micros(), 1);
        assert_eq!(usd(".5").micros(), 500_000);
        assert_eq!(usd("5.").micros(), 5_000_000);
        assert_eq!(usd("1e3").micros(), 1_000_000_000);
        assert_eq!(usd("1.5E-3").micros(), 1_500);
        assert_eq!(usd("+2.25").micros(), 2_250_000);
        assert_eq!(usd("-0").micros(), 0);
        assert_eq!(usd("0e999999").micros(), 0);
    }

    #[test]
    fn rounds_up_past_micros() {
        assert_eq!(usd("0.0000001").micros(), 1);
        assert_eq!(usd("0.0000010").micros(), 1);
        assert_eq!(usd("0.0000011").micros(), 2);
        assert_eq!(usd("1e-30").micros(), 1);
    }

    #[test]
    fn refuses_bad_input() {
        for bad in [
            "", " ", "abc", "1.2.3", "1e", "e5", ".", "--1", "0x10", "NaN", "inf", "1 000",
        ] {
            assert!(Money::parse_usd(bad).is_err(), "{bad:?} parsed");
        }
        assert!(matches!(
            Money::parse_usd("-1"),
            Err(MoneyError::Negative(_))
        ));
        assert!(matches!(
            Money::parse_usd("9223372036855"),
            Err(MoneyError::Overflow(_))
        ));
        assert!(matches!(
            Money::parse_usd("1e40"),
            Err(MoneyError::Overflow(_))
        ));
        assert!(Money::parse_usd("9223372036854.775807").is_ok());
        assert!(Money::parse_usd("9223372036854.7758071").is_err());
    }

    #[test]
    fn displays_six_decimals() {
        assert_eq!(usd("1.5").to_string(), "1.500000");
        assert_eq!(Money::from_micros(-1).to_string(), "-0.000001");
        assert_eq!(Money::ZERO.to_string(), "0.000000");
    }

    #[test]
    fn json_numbers_and_strings() {
        let a: Money = serde_json::from_str("0.1").unwrap();
        let b: Money = serde_json::from_str("\"0.2\"").unwrap();
        assert_eq!(a.checked_add(b), Some(usd("0.3")));
        let c: Money = serde_json::from_str("3").unwrap();
        assert_eq!(c, usd("3"));
        assert!(serde_json::from_str::<Money>("-3").is_err());
        assert!(serde_json::from_str::<Money>("1e300").is_err());
        assert!(serde_json::from_str::<Money>("true").is_err());
        assert_eq!(serde_json::to_string(&usd("0.3")).unwrap(), "0.3");
        // Every amount reads back exactly: a float below 10^15 micro-dollars, a string from
        // there up.
        for micros in [
            0,
            1,
            999_999_999_999_999,
            1_000_000_000_000_000,
            (1 << 53) - 1,
            i64::MAX,
        ] {
            let m = Money::from_micros(micros);
            let text = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<Money>(&text).unwrap(), m, "{text}");
        }
        assert_eq!(
            serde_json::to_string(&Money::from_micros(i64::MAX)).unwrap(),
            "\"9223372036854.775807\""
        );
        assert_eq!(
            serde_json::to_string(&usd("1234.000001")).unwrap(),
            "1234.000001"
        );
    }

    #[test]
    fn per_million_rounds_up() {
        // 1 token at $2.50 per million is 2.5 micro-dollars: charged 3.
        assert_eq!(Money::per_million(1, usd("2.5")).unwrap().micros(), 3);
        assert_eq!(
            Money::per_million(1_000_000, usd("2.5")).unwrap(),
            usd("2.5")
        );
        assert_eq!(Money::per_million(0, usd("2.5")).unwrap(), Money::ZERO);
        assert!(Money::per_million(u64::MAX, Money::MAX).is_none());
    }

    proptest! {
        #[test]
        fn display_round_trips(m in 0i64..i64::MAX) {
            let m = Money::from_micros(m);
            prop_assert_eq!(Money::parse_usd(&m.to_string()).unwrap(), m);
        }

        #[test]
        fn json_round_trips_for_realistic_amounts(m in 0i64..1_000_000_000_000_000) {
            // Up to a billion dollars, an f64 holds 6 decimals exactly enough to read back.
            let m = Money::from_micros(m);
            let json = serde_json::to_string(&m).unwrap();
            prop_assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), m);
        }

        #[test]
        fn parse_is_ceiling(int in 0u32..1_000_000, frac in 0u64..10_000_000_000) {
            // `int.frac` with 10 decimals: micros = ceil(value * 1e6).
            let s = format!("{int}.{frac:010}");
            let expected = int as i64 * 1_000_000 + frac.div_ceil(10_000) as i64;
            prop_assert_eq!(Money::parse_usd(&s).unwrap().micros(), expected);
        }
    }
}
