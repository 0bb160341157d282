//! Validated identifiers: tenants, companies, users, models, endpoints and idempotency keys.
//!
//! Every identifier is 1–128 characters of `[A-Za-z0-9._:@/-]`. They are parsed once at the
//! edge and are cheap to clone afterwards (`Arc<str>`).

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest identifier accepted.
pub const MAX_ID_LEN: usize = 128;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {MAX_ID_LEN} characters")]
    TooLong { kind: &'static str },
    #[error("{kind} contains {found:?}; allowed are letters, digits and . _ : @ / -")]
    BadChar { kind: &'static str, found: char },
}

fn validate(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { kind });
    }
    if let Some(found) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '/' | '-')))
    {
        return Err(IdError::BadChar { kind, found });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Parses and validates an identifier.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                validate($kind, s)?;
                Ok(Self(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A tenant: the top level of isolation. API keys belong to one tenant.
    TenantId,
    "tenant_id"
);
id_type!(
    /// A company inside a tenant.
    CompanyId,
    "company_id"
);
id_type!(
    /// A user inside a tenant.
    UserId,
    "user_id"
);
id_type!(
    /// A model name as the caller gives it, e.g. `gpt-4o-2024-08-06`.
    ModelName,
    "model"
);
id_type!(
    /// The caller's endpoint or feature name, e.g. `chat` or `/v1/chat/completions`.
    Endpoint,
    "endpoint"
);
id_type!(
    /// A caller-chosen key that makes a retried request return the first answer.
    IdempotencyKey,
    "idempotency_key"
);
id_type!(
    /// The name of a subscription tier, e.g. `free`.
    TierName,
    "tier"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        assert!(UserId::parse("user-42@example.com").is_ok());
        assert!(ModelName::parse("models/gemini-1.5-pro:latest").is_ok());
        assert!(UserId::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn refuses_the_rest() {
        assert_eq!(UserId::parse(""), Err(IdError::Empty { kind: "user_id" }));
        assert!(matches!(
            UserId::parse(&"a".repeat(129)),
            Err(IdError::TooLong { .. })
        ));
        for bad in ["a b", "a\u{0}b", "ü", "a;b", "a%2F", "a\nb", "a\"b"] {
            assert!(
                matches!(UserId::parse(bad), Err(IdError::BadChar { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn deserializes_with_validation() {
        let ok: TenantId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(ok.as_str(), "acme");
        let err = serde_json::from_str::<TenantId>("\"ac me\"").unwrap_err();
        assert!(err.to_string().contains("tenant_id contains ' '"), "{err}");
    }
}
