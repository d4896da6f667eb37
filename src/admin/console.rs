//! `/console`: the spend console, a page of the admin listener drawn in the browser from the
//! admin API. Its files are compiled into the binary (no CDN, nothing fetched elsewhere); the
//! admin token is entered once in its login form and becomes a session cookie
//! ([`super::session`]).

use http::{Method, Response, StatusCode};
use pingora::protocols::http::ServerSession;

use super::session::{cookie_of, COOKIE, LIFETIME};
use super::{error, same_secret, Admin, Reply};
use crate::runtime::AdminToken;

const LOGIN_HTML: &str = include_str!("console/login.html");
const APP_HTML: &str = include_str!("console/app.html");
const APP_JS: &str = include_str!("console/app.js");
const STYLE_CSS: &str = include_str!("console/style.css");

/// The page may load only its own files and talk only to its own origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn page(status: u16, content_type: &str) -> http::response::Builder {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header("content-security-policy", CSP)
        .header("x-content-type-options", "nosniff")
        .header("x-frame-options", "DENY")
        .header("referrer-policy", "no-referrer")
}

fn send(builder: http::response::Builder, body: Vec<u8>) -> Reply {
    builder.header(http::header::CONTENT_LENGTH, body.len()).body(body).expect("valid response")
}

fn html(status: u16, text: String) -> Reply {
    let body = text.into_bytes();
    send(page(status, "text/html; charset=utf-8").header("cache-control", "no-store"), body)
}

fn asset(content_type: &str, text: &'static str) -> Reply {
    send(page(200, content_type).header("cache-control", "no-cache"), text.as_bytes().to_vec())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn login_page(status: u16, message: &str) -> Reply {
    let message = if message.is_empty() {
        String::new()
    } else {
        format!("<p id=\"login-error\" role=\"alert\">{}</p>", escape(message))
    };
    html(status, LOGIN_HTML.replace("{{error}}", &message))
}

fn redirect(to: &str, cookie: Option<String>) -> Reply {
    let mut b = Response::builder().status(StatusCode::SEE_OTHER).header(http::header::LOCATION, to);
    if let Some(c) = cookie {
        b = b.header(http::header::SET_COOKIE, c);
    }
    b.header(http::header::CONTENT_LENGTH, 0).header("cache-control", "no-store").body(Vec::new()).expect("valid")
}

impl Admin {
    pub(super) async fn console(&self, session: &mut ServerSession, path: &str) -> Reply {
        let method = session.req_header().method.clone();
        match (&method, path) {
            (&Method::GET, "/console") => self.console_page(session),
            (&Method::GET, "/console/app.js") => asset("text/javascript; charset=utf-8", APP_JS),
            (&Method::GET, "/console/style.css") => asset("text/css; charset=utf-8", STYLE_CSS),
            (&Method::POST, "/console/login") => self.login(session).await,
            (&Method::POST, "/console/logout") => {
                // Only the page itself can sign out (the CSRF token), not another site.
                if self.authorized(session).is_ok() {
                    if let Some(id) = cookie_of(session.req_header().headers.get(http::header::COOKIE)) {
                        self.sessions.close(&id);
                    }
                }
                redirect("/console", Some(format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")))
            }
            (_, "/console" | "/console/login" | "/console/logout" | "/console/app.js" | "/console/style.css") => {
                error(405, "invalid_request_error", format!("{method} is not allowed on {path}"))
            }
            _ => error(404, "not_found_error", format!("no console page at {path}")),
        }
    }

    /// The console for a live session, the login form otherwise.
    fn console_page(&self, session: &ServerSession) -> Reply {
        let token = self.runtime.admin_token.load_full();
        let AdminToken::Set(token) = &*token else {
            return login_page(503, "The admin API is closed: set admin.token in the config to use the console.");
        };
        let csrf = cookie_of(session.req_header().headers.get(http::header::COOKIE))
            .and_then(|id| self.sessions.check(&id, token.expose()));
        match csrf {
            Some(csrf) => html(200, APP_HTML.replace("{{csrf}}", &csrf)),
            None => login_page(200, ""),
        }
    }

    async fn login(&self, session: &mut ServerSession) -> Reply {
        let body = match Self::read_body(session).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let presented = form_urlencoded::parse(&body).find(|(k, _)| k == "token").map(|(_, v)| v.into_owned());
        let token = self.runtime.admin_token.load_full();
        let AdminToken::Set(token) = &*token else {
            return login_page(503, "The admin API is closed: set admin.token in the config to use the console.");
        };
        match presented {
            Some(p) if same_secret(p.trim().as_bytes(), token.expose().as_bytes()) => {
                let (id, _) = self.sessions.open(token.expose());
                // Secure when the admin listener speaks TLS: the cookie then never crosses
                // plain HTTP.
                let secure =
                    if self.runtime.config().admin.as_ref().is_some_and(|a| a.tls.is_some()) { "; Secure" } else { "" };
                let cookie =
                    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}", LIFETIME.as_secs());
                tracing::info!(client = ?session.client_addr().map(|a| a.to_string()), "console sign-in");
                redirect("/console", Some(cookie))
            }
            _ => {
                tracing::warn!(client = ?session.client_addr().map(|a| a.to_string()), "console sign-in refused");
                // A second per wrong guess: slows a guesser down, costs a person nothing.
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                login_page(401, "That is not the admin token.")
            }
        }
    }
}
