//! Console sessions: the admin token, entered once in the console's login form, becomes a
//! random session id in an HttpOnly, SameSite=Strict cookie, with a CSRF token of its own that
//! the page sends back on every change.
//!
//! Sessions live in this gateway's memory (a restart signs everyone out), expire after
//! [`LIFETIME`], and end when the admin token changes: one made with an old token is no
//! longer valid once a reload brings a new one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a console session lasts.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions held at most; past it the oldest goes (a login loop cannot grow memory).
const MAX_SESSIONS: usize = 1024;
pub const COOKIE: &str = "tollgate_console";

struct Session {
    csrf: String,
    /// A digest of the admin token it was made with.
    token: [u8; 32],
    created: Instant,
}

#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Session>>,
}

fn digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Sessions {
    /// A new session for a caller who presented `token` (already checked): its id and CSRF
    /// token.
    pub fn open(&self, token: &str) -> (String, String) {
        let (id, csrf) = (random_hex(), random_hex());
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, s| s.created.elapsed() < LIFETIME);
        if live.len() >= MAX_SESSIONS {
            if let Some(oldest) = live.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| k.clone()) {
                live.remove(&oldest);
            }
        }
        live.insert(id.clone(), Session { csrf: csrf.clone(), token: digest(token), created: Instant::now() });
        (id, csrf)
    }

    /// The CSRF token of a live session made with the current admin `token`.
    pub fn check(&self, id: &str, token: &str) -> Option<String> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let s = live.get(id)?;
        if s.created.elapsed() >= LIFETIME || !super::same_secret(&s.token, &digest(token)) {
            live.remove(id);
            return None;
        }
        Some(s.csrf.clone())
    }

    pub fn close(&self, id: &str) {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

/// The session id in a `Cookie` header, if any.
pub fn cookie_of(header: Option<&http::HeaderValue>) -> Option<String> {
    let text = header?.to_str().ok()?;
    text.split(';').map(str::trim).find_map(|c| c.strip_prefix(COOKIE)?.strip_prefix('=')).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_needs_the_token_it_was_made_with() {
        let s = Sessions::default();
        let (id, csrf) = s.open("t1");
        assert_eq!(s.check(&id, "t1"), Some(csrf));
        assert_eq!(s.check(&id, "t2"), None);
        // Gone for good once seen with another token.
        assert_eq!(s.check(&id, "t1"), None);
        assert_eq!(s.check("nope", "t1"), None);
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let h = http::HeaderValue::from_static("a=1; tollgate_console=abc; b=2");
        assert_eq!(cookie_of(Some(&h)).as_deref(), Some("abc"));
        let h = http::HeaderValue::from_static("tollgate_consolex=abc");
        assert_eq!(cookie_of(Some(&h)), None);
    }
}
