//! Sealing the identity provider's refresh tokens at rest: ChaCha20-Poly1305 with a random nonce
//! and the session id as associated data, so a sealed token copied to another session's row does
//! not open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};

pub struct Sealer(LessSafeKey);

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Self {
        Sealer(LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte key")))
    }

    /// Nonce, then ciphertext and tag.
    pub fn seal(&self, plain: &[u8], aad: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut out = plain.to_vec();
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out)
            .expect("sealing a short token");
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&out);
        sealed
    }

    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self.0.open_in_place(nonce, Aad::from(aad), &mut body).ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_only_with_its_key_and_session() {
        let s = Sealer::new(&[7; 32]);
        let sealed = s.seal(b"idp-refresh", b"session-1");
        assert_eq!(s.open(&sealed, b"session-1").as_deref(), Some(&b"idp-refresh"[..]));
        assert_eq!(s.open(&sealed, b"session-2"), None);
        assert_eq!(Sealer::new(&[8; 32]).open(&sealed, b"session-1"), None);
    }
}
