//! Encryption of secrets at rest (job tokens and environment), keyed from
//! `GATEWAY_SECRET_KEY`. AES-256-GCM with a random nonce per value; the key
//! is SHA-256 of the configured secret so any length of secret works.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("a stored secret could not be decrypted (was GATEWAY_SECRET_KEY changed?)")]
    Decrypt,
    #[error("a secret could not be encrypted")]
    Encrypt,
}

/// Seals and opens values. Cloning is cheap; `Debug` never shows the key.
#[derive(Clone)]
pub struct SecretBox {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

const NONCE_LEN: usize = 12;
/// The development key used with `DEBUG=1` when no key is configured.
const DEBUG_KEY: &str = "qs-gateway-insecure-development-key";

impl SecretBox {
    pub fn new(secret: &str) -> Self {
        let key = Sha256::digest(secret.as_bytes());
        SecretBox {
            cipher: Aes256Gcm::new(&key),
        }
    }

    /// The configured key, or the fixed development key.
    pub fn from_config(secret: Option<&str>) -> Self {
        Self::new(secret.unwrap_or(DEBUG_KEY))
    }

    /// nonce || ciphertext+tag
    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut out = nonce.to_vec();
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plain)
            .map_err(|_| SecretError::Encrypt)?;
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, SecretError> {
        if sealed.len() < NONCE_LEN {
            return Err(SecretError::Decrypt);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), body)
            .map_err(|_| SecretError::Decrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_key() {
        let a = SecretBox::new("k1");
        let sealed = a.seal(b"token-123").unwrap();
        assert!(!sealed.windows(9).any(|w| w == b"token-123"));
        assert_eq!(a.open(&sealed).unwrap(), b"token-123");
        assert!(SecretBox::new("k2").open(&sealed).is_err());
        assert!(a.open(b"short").is_err());
        assert_ne!(
            a.seal(b"x").unwrap(),
            a.seal(b"x").unwrap(),
            "nonces differ"
        );
    }
}
