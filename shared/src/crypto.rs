//! Secrets encrypted at rest (docs/security.md, "Secrets encrypted at rest"): an AES-256-GCM
//! envelope `v1:<key-id>:<base64(nonce ‖ ciphertext ‖ tag)>` with a random 96-bit nonce per value
//! and the row's identity as additional authenticated data, under a [`Keyring`] that holds the
//! current key (encrypts) and old keys (still decrypt) while a rotation is under way.
//!
//! The keyring is installed once per process at startup ([`install`]), like the template budget:
//! the store functions that read and write secret columns are called from many places that only
//! hold a pool, and the key must not travel through them.

use std::sync::OnceLock;

use base64::{engine::general_purpose::STANDARD, Engine};
use ring::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN},
    rand::{SecureRandom, SystemRandom},
};
use sha2::{Digest, Sha256};

/// The variable holding the current key (base64 of 32 bytes).
pub const KEY_VAR: &str = "CAPIBARA_SECRETS_KEY";
/// The variable naming a file that holds the current key (base64 of 32 bytes).
pub const KEY_FILE_VAR: &str = "CAPIBARA_SECRETS_KEY_FILE";
/// Old keys still accepted for decryption, comma-separated.
pub const OLD_KEYS_VAR: &str = "CAPIBARA_SECRETS_OLD_KEYS";

const VERSION: &str = "v1";

/// Why a value could not be sealed or opened. Never carries the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("no secrets key is configured in this process (set {KEY_VAR})")]
    NotConfigured,
    #[error("a stored secret was encrypted with key {0}, which is not configured (add it to {OLD_KEYS_VAR})")]
    UnknownKey(String),
    #[error("a stored secret is not a valid encrypted value")]
    Malformed,
    #[error(
        "a stored secret does not decrypt with key {0}: it was altered or belongs to another row"
    )]
    Tampered(String),
}

/// Why the configured keys are not usable (a startup error: names the variable and how to make a
/// key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {message}")]
pub struct KeyConfigError {
    pub var: &'static str,
    pub message: String,
}

/// One AES-256 key and its id.
pub struct Key {
    id: String,
    key: LessSafeKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// A key from its 32 bytes; its id is the first 4 bytes of their SHA-256, in hex.
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        let id = hex::encode(&Sha256::digest(bytes)[..4]);
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte key"));
        Self { id, key }
    }

    /// A key from its base64 text (`openssl rand -base64 32`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| "is not base64".to_string())?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("decodes to {} bytes, not 32", b.len()))?;
        Ok(Self::from_bytes(&bytes))
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

/// A fresh random key as base64 text (what `capibara dev` writes into its data directory).
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source");
    STANDARD.encode(bytes)
}

/// The key that encrypts and the keys that still decrypt.
#[derive(Debug)]
pub struct Keyring {
    current: Key,
    old: Vec<Key>,
}

const HOW: &str = "generate one with `openssl rand -base64 32`";

impl Keyring {
    pub fn new(current: Key, old: Vec<Key>) -> Self {
        let old = old.into_iter().filter(|k| k.id != current.id).collect();
        Self { current, old }
    }

    /// The keyring from `CAPIBARA_SECRETS_KEY` (or `CAPIBARA_SECRETS_KEY_FILE`) and
    /// `CAPIBARA_SECRETS_OLD_KEYS`; `Ok(None)` when no key is set.
    pub fn from_env() -> Result<Option<Self>, KeyConfigError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let current = match (var(KEY_VAR), var(KEY_FILE_VAR)) {
            (Some(_), Some(_)) => {
                return Err(KeyConfigError {
                    var: KEY_VAR,
                    message: format!("set either {KEY_VAR} or {KEY_FILE_VAR}, not both"),
                })
            }
            (Some(text), None) => Key::parse(&text).map_err(|m| KeyConfigError {
                var: KEY_VAR,
                message: format!("{m}: it must be the base64 of 32 random bytes ({HOW})"),
            })?,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| KeyConfigError {
                    var: KEY_FILE_VAR,
                    message: format!("cannot read {path}: {e}"),
                })?;
                Key::parse(&text).map_err(|m| KeyConfigError {
                    var: KEY_FILE_VAR,
                    message: format!(
                        "the content of {path} {m}: it must be the base64 of 32 random bytes ({HOW})"
                    ),
                })?
            }
            (None, None) => return Ok(None),
        };
        let mut old = Vec::new();
        for (i, text) in var(OLD_KEYS_VAR)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .enumerate()
        {
            old.push(Key::parse(text).map_err(|m| KeyConfigError {
                var: OLD_KEYS_VAR,
                message: format!("key {} {m}: each must be the base64 of 32 bytes", i + 1),
            })?);
        }
        Ok(Some(Self::new(current, old)))
    }

    /// [`Self::from_env`], refusing a missing key with the one-line startup error.
    pub fn require_from_env() -> Result<Self, KeyConfigError> {
        Self::from_env()?.ok_or_else(|| KeyConfigError {
            var: KEY_VAR,
            message: format!(
                "not set: secrets are encrypted at rest and this process needs the key ({HOW}; \
                 or set {KEY_FILE_VAR} to a file holding it)"
            ),
        })
    }

    /// The id of the key that encrypts.
    pub fn current_id(&self) -> &str {
        &self.current.id
    }

    /// Whether a value stored under `id` can be decrypted here.
    pub fn knows(&self, id: &str) -> bool {
        self.key(id).is_some()
    }

    fn key(&self, id: &str) -> Option<&Key> {
        std::iter::once(&self.current)
            .chain(&self.old)
            .find(|k| k.id == id)
    }

    /// `plaintext` encrypted under the current key, bound to `aad` (the row's identity).
    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system's random source");
        let mut buf = plaintext.to_vec();
        self.current
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .expect("AES-GCM seals any length a row holds");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        format!("{VERSION}:{}:{}", self.current.id, STANDARD.encode(out))
    }

    /// The plaintext of an envelope sealed for `aad`.
    pub fn open(&self, aad: &str, sealed: &str) -> Result<Vec<u8>, CryptoError> {
        let (id, body) = key_id_of(sealed).ok_or(CryptoError::Malformed)?;
        let key = self
            .key(id)
            .ok_or_else(|| CryptoError::UnknownKey(id.to_string()))?;
        let bytes = STANDARD.decode(body).map_err(|_| CryptoError::Malformed)?;
        if bytes.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(CryptoError::Malformed);
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Malformed)?;
        let mut buf = rest.to_vec();
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| CryptoError::Tampered(id.to_string()))?;
        Ok(plain.to_vec())
    }

    /// [`Self::open`] for text values.
    pub fn open_text(&self, aad: &str, sealed: &str) -> Result<String, CryptoError> {
        String::from_utf8(self.open(aad, sealed)?).map_err(|_| CryptoError::Malformed)
    }
}

/// The key id and the base64 body of an envelope.
fn key_id_of(sealed: &str) -> Option<(&str, &str)> {
    let rest = sealed.strip_prefix(VERSION)?.strip_prefix(':')?;
    rest.split_once(':')
}

/// The additional authenticated data of a row: its table and identity, NUL-separated (no stored
/// name holds a NUL: the API refuses them).
pub fn aad(table: &str, identity: &[&str]) -> String {
    let mut out = String::from(table);
    for part in identity {
        out.push('\0');
        out.push_str(part);
    }
    out
}

static KEYRING: OnceLock<Keyring> = OnceLock::new();

/// Install this process's keyring (once; later calls are ignored: one process, one keyring).
pub fn install(keyring: Keyring) {
    let _ = KEYRING.set(keyring);
}

/// Read the keys from the environment and install them: the api, the worker and the scheduler
/// call it first thing, so a missing or malformed key is a one-line startup error.
pub fn install_from_env() -> Result<(), KeyConfigError> {
    install(Keyring::require_from_env()?);
    Ok(())
}

/// This process's keyring.
pub fn keyring() -> Result<&'static Keyring, CryptoError> {
    KEYRING.get().ok_or(CryptoError::NotConfigured)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(byte: u8) -> Keyring {
        Keyring::new(Key::from_bytes(&[byte; 32]), vec![])
    }

    #[test]
    fn a_value_round_trips_and_each_seal_uses_a_fresh_nonce() {
        let k = ring(1);
        let a = k.seal("secrets\0ns\0TOKEN", b"s3cr3t");
        let b = k.seal("secrets\0ns\0TOKEN", b"s3cr3t");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("v1:{}:", k.current_id())));
        assert!(!a.contains("s3cr3t"));
        assert_eq!(k.open_text("secrets\0ns\0TOKEN", &a).unwrap(), "s3cr3t");
    }

    #[test]
    fn a_tampered_value_or_another_rows_aad_does_not_open() {
        let k = ring(1);
        let sealed = k.seal(&aad("secrets", &["ns", "A"]), b"value");
        let (prefix, body) = sealed.rsplit_once(':').unwrap();
        let mut bytes = STANDARD.decode(body).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let tampered = format!("{prefix}:{}", STANDARD.encode(bytes));
        let id = k.current_id().to_string();
        assert_eq!(
            k.open(&aad("secrets", &["ns", "A"]), &tampered),
            Err(CryptoError::Tampered(id.clone()))
        );
        assert_eq!(
            k.open(&aad("secrets", &["ns", "B"]), &sealed),
            Err(CryptoError::Tampered(id.clone()))
        );
        assert_eq!(
            k.open(&aad("secrets", &["other", "A"]), &sealed),
            Err(CryptoError::Tampered(id))
        );
        assert_eq!(k.open("x", "v1:zz"), Err(CryptoError::Malformed));
        assert_eq!(k.open("x", "plain text"), Err(CryptoError::Malformed));
    }

    #[test]
    fn an_unknown_key_id_is_named_and_old_keys_still_open() {
        let old = ring(1);
        let sealed = old.seal("t\0id", b"v");
        let new = ring(2);
        assert_eq!(
            new.open("t\0id", &sealed),
            Err(CryptoError::UnknownKey(old.current_id().to_string()))
        );
        let rotating = Keyring::new(Key::from_bytes(&[2; 32]), vec![Key::from_bytes(&[1; 32])]);
        assert!(rotating.knows(old.current_id()));
        assert_eq!(rotating.open("t\0id", &sealed).unwrap(), b"v");
        assert_eq!(rotating.current_id(), new.current_id());
    }

    #[test]
    fn keys_parse_from_base64_of_32_bytes_only() {
        let text = generate_key();
        let key = Key::parse(&text).unwrap();
        assert_eq!(key.id().len(), 8);
        assert_eq!(Key::parse(&format!(" {text}\n")).unwrap().id(), key.id());
        assert_eq!(
            Key::parse("c2hvcnQ=").unwrap_err(),
            "decodes to 5 bytes, not 32"
        );
        assert_eq!(Key::parse("not base64!").unwrap_err(), "is not base64");
    }
}
