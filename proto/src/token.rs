//! Bootstrap tokens: `[a-z0-9]{6}.[a-z0-9]{16}`, the format Kubernetes uses for bootstrap tokens
//! and the one our enrollment tokens share.

use std::fmt;
use std::str::FromStr;

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
/// Characters of a token's public id.
pub const ID_LEN: usize = 6;
/// Characters of a token's secret.
pub const SECRET_LEN: usize = 16;

/// A bootstrap token. `Debug` and `Display` never show the secret; use [`BootstrapToken::expose`]
/// where the whole token must be written (a payload, a Secret).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BootstrapToken {
    id: String,
    secret: String,
}

/// A string that is not a bootstrap token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{shown}' is not a bootstrap token (expected [a-z0-9]{{6}}.[a-z0-9]{{16}})")]
pub struct InvalidToken {
    /// The offending value with any secret part masked.
    pub shown: String,
}

fn is_token_part(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl BootstrapToken {
    /// A new token from the system CSPRNG (rejection sampling keeps the 36 symbols uniform).
    pub fn generate() -> Self {
        Self { id: random_string(ID_LEN), secret: random_string(SECRET_LEN) }
    }

    /// The public part: names the token in Secrets, the audit log and `imgbuild token list`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The secret part: never logged; keys the bootstrap signer's HMAC.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The whole token, `id.secret`.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    /// Checks a token id alone (`[a-z0-9]{6}`), as used by `token revoke ID`.
    pub fn is_valid_id(id: &str) -> bool {
        is_token_part(id, ID_LEN)
    }

    /// Constant-time comparison of a presented token against this one.
    pub fn matches(&self, presented: &BootstrapToken) -> bool {
        // Both secrets have the fixed length, so a fold over all bytes leaks nothing but equality.
        let diff = self.secret.bytes().zip(presented.secret.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        self.id == presented.id && diff == 0
    }
}

/// `len` symbols of [a-z0-9] from the system CSPRNG.
pub fn random_string(len: usize) -> String {
    let rng = SystemRandom::new();
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 32];
    while out.len() < len {
        #[expect(
            clippy::expect_used,
            reason = "getrandom(2) blocks until the kernel's pool is seeded and then does not fail; a token without randomness must not exist"
        )]
        rng.fill(&mut buf).expect("the system CSPRNG failed");
        // 252 = 7 * 36: bytes >= 252 would bias the first symbols, so they are dropped.
        for b in buf.iter().filter(|&&b| b < 252) {
            if out.len() == len {
                break;
            }
            out.push(ALPHABET[(*b % 36) as usize] as char);
        }
    }
    out
}

impl FromStr for BootstrapToken {
    type Err = InvalidToken;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('.') {
            Some((id, secret)) if is_token_part(id, ID_LEN) && is_token_part(secret, SECRET_LEN) => {
                Ok(Self { id: id.to_string(), secret: secret.to_string() })
            }
            Some((id, _)) => Err(InvalidToken { shown: format!("{id}.<hidden>") }),
            // Without a dot the whole value may be a secret: show only its start.
            None => Err(InvalidToken { shown: format!("{}…", s.chars().take(ID_LEN).collect::<String>()) }),
        }
    }
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BootstrapToken({}.<hidden>)", self.id)
    }
}

impl fmt::Display for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.<hidden>", self.id)
    }
}

impl Serialize for BootstrapToken {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.expose())
    }
}

impl<'de> Deserialize<'de> for BootstrapToken {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_tokens_have_the_kubernetes_format() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let t = BootstrapToken::generate();
            let s = t.expose();
            assert_eq!(s.parse::<BootstrapToken>().unwrap(), t);
            assert!(seen.insert(s), "a repeated token from the CSPRNG");
        }
    }

    #[test]
    fn parse_cases() {
        let cases = [
            ("valid", "abcdef.0123456789abcdef", true),
            ("uppercase", "ABCDEF.0123456789abcdef", false),
            ("short secret", "abcdef.0123456789abcde", false),
            ("long id", "abcdefg.0123456789abcdef", false),
            ("no dot", "abcdef0123456789abcdef", false),
            ("symbol", "abc-ef.0123456789abcdef", false),
            ("empty", "", false),
        ];
        for (name, input, ok) in cases {
            assert_eq!(input.parse::<BootstrapToken>().is_ok(), ok, "case {name}");
        }
    }

    #[test]
    fn secret_never_shown() {
        let t: BootstrapToken = "abcdef.0123456789abcdef".parse().unwrap();
        assert!(!format!("{t} {t:?}").contains("0123456789abcdef"));
        let e = "abcdef.0123456789ABCDEF".parse::<BootstrapToken>().unwrap_err();
        assert!(!e.to_string().contains("0123456789"), "{e}");
    }

    proptest! {
        #[test]
        fn parser_never_panics(s in "\\PC*") {
            let _ = s.parse::<BootstrapToken>();
        }

        #[test]
        fn roundtrip(id in "[a-z0-9]{6}", secret in "[a-z0-9]{16}") {
            let s = format!("{id}.{secret}");
            prop_assert_eq!(s.parse::<BootstrapToken>().unwrap().expose(), s);
        }
    }
}
