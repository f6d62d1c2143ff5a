use std::collections::HashMap;
use std::fmt;

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use base64ct::{Base64ShaCrypt, Encoding};
use password_hash::rand_core::OsRng;
use password_hash::SaltString;

use crate::PolicyError;

/// Verified against when the user is unknown and no real hash is configured, so the
/// reply to AUTH takes as long as for a real user. argon2id with the crate's
/// default parameters (what `hash_password` produces) of a random password.
const DUMMY_ARGON2: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$wOUA2LKk8npzu8z17scJRA$jiFXeLf4l/Y2jWYK6Q9XLYw8HCt1nvVySKYs5O6amDo";

/// Bounds sha-crypt enforces (its `ROUNDS_MIN`/`ROUNDS_MAX`).
const SHA_CRYPT_ROUNDS: std::ops::RangeInclusive<usize> = 1_000..=999_999_999;

/// SMTP AUTH credentials: user name -> password hash.
///
/// Every hash is checked when loaded, so a bad config fails at start rather than
/// at the first AUTH. Verification is slow by design (argon2: tens of ms): run it
/// off the executor threads.
#[derive(Clone)]
pub struct Credentials {
    users: HashMap<String, StoredHash>,
    /// Stand-in verified for unknown users. A real user's hash when there is one, so
    /// that its algorithm and cost match what known users take.
    dummy: StoredHash,
}

#[derive(Clone)]
enum StoredHash {
    /// PHC string for argon2id / argon2i / argon2d.
    Argon2(String),
    /// `$6$…` SHA-512 crypt.
    Sha512(String),
    /// `$5$…` SHA-256 crypt.
    Sha256(String),
}

impl Credentials {
    pub fn new(
        users: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Credentials, PolicyError> {
        let mut map = HashMap::new();
        for (user, hash) in users {
            let bad = |reason: String| PolicyError::InvalidCredential {
                user: user.clone(),
                reason,
            };
            if user.is_empty() {
                return Err(bad("empty user name".into()));
            }
            let stored = StoredHash::parse(&hash).map_err(bad)?;
            if map.contains_key(&user) {
                return Err(bad("defined twice".into()));
            }
            map.insert(user, stored);
        }
        // Smallest name: deterministic, unlike HashMap iteration order.
        let dummy = map
            .iter()
            .min_by(|a, b| a.0.cmp(b.0))
            .map(|(_, h)| h.clone())
            .unwrap_or_else(|| StoredHash::Argon2(DUMMY_ARGON2.to_string()));
        Ok(Credentials { users: map, dummy })
    }

    /// True when `password` matches the stored hash for `user`. For an unknown user
    /// a verification still runs (and its result is thrown away) so that timing does
    /// not reveal which users exist.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => hash.verify(password),
            None => {
                std::hint::black_box(self.dummy.verify(password));
                false
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }
}

/// Names only: hashes stay out of logs.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.users.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Credentials")
            .field("users", &names)
            .finish()
    }
}

impl StoredHash {
    fn parse(hash: &str) -> Result<StoredHash, String> {
        if hash.starts_with("$argon2") {
            check_argon2(hash)?;
            Ok(StoredHash::Argon2(hash.to_string()))
        } else if hash.starts_with("$6$") {
            check_sha_crypt(hash, 86)?;
            Ok(StoredHash::Sha512(hash.to_string()))
        } else if hash.starts_with("$5$") {
            check_sha_crypt(hash, 43)?;
            Ok(StoredHash::Sha256(hash.to_string()))
        } else {
            Err(
                "unsupported password hash: expected $argon2id$, $argon2i$, $argon2d$, $6$ or $5$"
                    .into(),
            )
        }
    }

    fn verify(&self, password: &str) -> bool {
        match self {
            StoredHash::Argon2(s) => match PasswordHash::new(s) {
                Ok(parsed) => Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok(),
                Err(_) => false,
            },
            StoredHash::Sha512(s) => sha_crypt::sha512_check(password, s).is_ok(),
            StoredHash::Sha256(s) => sha_crypt::sha256_check(password, s).is_ok(),
        }
    }
}

fn check_argon2(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("malformed argon2 hash: {e}"))?;
    argon2::Algorithm::try_from(parsed.algorithm)
        .map_err(|_| format!("unknown algorithm {}", parsed.algorithm))?;
    if let Some(v) = parsed.version {
        argon2::Version::try_from(v).map_err(|_| format!("unknown argon2 version {v}"))?;
    }
    argon2::Params::try_from(&parsed).map_err(|e| format!("bad argon2 parameters: {e}"))?;
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err("argon2 hash lacks salt or output".into());
    }
    Ok(())
}

/// Mirrors the parsing in sha-crypt's `sha512_check`/`sha256_check`
/// (`$N$[rounds=R$]salt$hash`) and decodes the hash with the same base64 variant:
/// `sha256_check` unwraps that decode, so a hash that passes here cannot panic there.
fn check_sha_crypt(hash: &str, encoded_len: usize) -> Result<(), String> {
    let mut parts = hash.split('$');
    // "", "6" or "5": guaranteed by the caller's prefix test.
    parts.next();
    parts.next();
    let mut next = parts.next().ok_or("missing salt")?;
    if let Some(rounds) = next.strip_prefix("rounds=") {
        let rounds: usize = rounds.parse().map_err(|_| "rounds= is not a number")?;
        if !SHA_CRYPT_ROUNDS.contains(&rounds) {
            return Err("rounds must be between 1000 and 999999999".into());
        }
        next = parts.next().ok_or("missing salt")?;
    }
    let _salt = next;
    let encoded = parts.next().ok_or("missing hash")?;
    if parts.next().is_some() {
        return Err("trailing data after hash".into());
    }
    if encoded.len() != encoded_len {
        return Err(format!("hash must be {encoded_len} characters"));
    }
    let mut buf = [0u8; 86];
    let decoded_len = encoded_len * 6 / 8;
    Base64ShaCrypt::decode(encoded, &mut buf[..decoded_len])
        .map_err(|_| "hash is not valid crypt base64".to_string())?;
    Ok(())
}

/// Hash a password for the config: argon2id, default parameters, random salt.
pub fn hash_password(password: &str) -> Result<String, PolicyError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PolicyError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // `openssl passwd -6 -salt saltsalt secret`
    const SHA512_SECRET: &str =
        "$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1";
    // `openssl passwd -5 -salt saltsalt secret`
    const SHA256_SECRET: &str = "$5$saltsalt$0IyaXrmV7.sGNS6tirgqHLqX/G.FBvgkYA.lpPdS5sA";
    // glibc crypt("secret", "$6$rounds=1000$saltsalt")
    const SHA512_ROUNDS_SECRET: &str =
        "$6$rounds=1000$saltsalt$LAV5VE5Y7w1d73x1mFNspYWUpazfmwv2SoepNXNKJ/otop/Zok96Hr8Q13LEv0DRY/x8v0/crpIjl8NJSAqXV/";

    fn creds(pairs: &[(&str, &str)]) -> Result<Credentials, PolicyError> {
        Credentials::new(pairs.iter().map(|(u, h)| (u.to_string(), h.to_string())))
    }

    #[test]
    fn argon2id_roundtrip() {
        let hash = hash_password("correct horse").expect("hash");
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        let c = creds(&[("alice", &hash)]).expect("load");
        assert!(c.verify("alice", "correct horse"));
        assert!(!c.verify("alice", "correct horse "));
        assert!(!c.verify("alice", ""));
        assert!(!c.verify("Alice", "correct horse"));
    }

    #[test]
    fn salts_differ() {
        let a = hash_password("x").expect("hash");
        let b = hash_password("x").expect("hash");
        assert_ne!(a, b);
    }

    #[test]
    fn argon2i_and_argon2d_verify() {
        let salt = SaltString::encode_b64(b"0123456789abcdef").expect("salt");
        for alg in [argon2::Algorithm::Argon2i, argon2::Algorithm::Argon2d] {
            let params = argon2::Params::new(1024, 1, 1, None).expect("params");
            let hash = Argon2::new(alg, argon2::Version::V0x13, params)
                .hash_password(b"pw", &salt)
                .expect("hash")
                .to_string();
            assert!(hash.starts_with(&format!("${}$", alg.as_str())), "{hash}");
            let c = creds(&[("u", &hash)]).expect("load");
            assert!(c.verify("u", "pw"));
            assert!(!c.verify("u", "pw2"));
        }
    }

    #[test]
    fn sha_crypt_verify() {
        let c = creds(&[
            ("s512", SHA512_SECRET),
            ("s256", SHA256_SECRET),
            ("rounds", SHA512_ROUNDS_SECRET),
        ])
        .expect("load");
        assert!(c.verify("s512", "secret"));
        assert!(!c.verify("s512", "Secret"));
        assert!(c.verify("s256", "secret"));
        assert!(!c.verify("s256", "secre"));
        assert!(c.verify("rounds", "secret"));
        assert!(!c.verify("rounds", "secret\n"));
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn unknown_user_is_false() {
        let c = creds(&[("alice", SHA512_SECRET)]).expect("load");
        assert!(!c.verify("bob", "secret"));
        assert!(!c.verify("", "secret"));
        let empty = creds(&[]).expect("load");
        assert!(empty.is_empty());
        assert!(!empty.verify("alice", "secret"));
    }

    #[test]
    fn dummy_hash_is_valid_argon2() {
        // The stand-in must be real work, not a parse failure that returns at once.
        check_argon2(DUMMY_ARGON2).expect("dummy parses");
        assert!(!StoredHash::Argon2(DUMMY_ARGON2.into()).verify("anything"));
    }

    #[test]
    fn bad_hashes_rejected_at_load_naming_the_user() {
        let truncated512 = &SHA512_SECRET[..SHA512_SECRET.len() - 1];
        let truncated256 = &SHA256_SECRET[..SHA256_SECRET.len() - 1];
        // Valid length, but a final character with bits set beyond the 32 bytes:
        // sha-crypt would unwrap this decode at AUTH time.
        let noncanonical256 = format!("{}z", truncated256);
        let bad_b64 = format!("{}!", truncated512);
        let cases = [
            "plaintext",
            "",
            "$1$saltsalt$abc",
            "$2b$12$abcdefghijklmnopqrstuv",
            "$argon2id$v=19$m=19456,t=2,p=1$",
            "$argon2id$v=19$m=1,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2x$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ",
            "$6$",
            "$6$saltsalt",
            "$6$saltsalt$short",
            "$6$rounds=abc$saltsalt$x",
            "$6$rounds=10$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1",
            "$5$saltsalt$0IyaXrmV7.sGNS6tirgqHLqX/G.FBvgkYA.lpPdS5sA$extra",
            truncated512,
            truncated256,
            &noncanonical256,
            &bad_b64,
        ];
        for bad in cases {
            match creds(&[("good", SHA512_SECRET), ("mallory", bad)]) {
                Err(PolicyError::InvalidCredential { user, .. }) => {
                    assert_eq!(user, "mallory", "{bad:?}")
                }
                Ok(_) => panic!("{bad:?} accepted"),
                Err(e) => panic!("{bad:?} gave {e:?}"),
            }
        }
    }

    #[test]
    fn empty_and_duplicate_users_rejected() {
        assert!(creds(&[("", SHA512_SECRET)]).is_err());
        let dup = creds(&[("a", SHA512_SECRET), ("a", SHA256_SECRET)]);
        assert!(matches!(dup, Err(PolicyError::InvalidCredential { user, .. }) if user == "a"));
    }

    #[test]
    fn debug_hides_hashes() {
        let c = creds(&[("alice", SHA512_SECRET)]).expect("load");
        let shown = format!("{c:?}");
        assert!(shown.contains("alice"));
        assert!(!shown.contains("saltsalt"), "{shown}");
    }

    #[test]
    fn error_text_names_user_not_hash() {
        let err = creds(&[("mallory", "$6$secretsalt$nope")]).expect_err("bad");
        let text = err.to_string();
        assert!(text.contains("mallory"), "{text}");
        assert!(!text.contains("secretsalt"), "{text}");
    }
}
