//! The connection to the shared limiter: one Redis (or Valkey) address, through a connection
//! manager that reconnects by itself, or a Redis Cluster, whose client follows the cluster's
//! slot map and its redirections (every key of the limiter shares one hash tag, so one slot:
//! each script runs on the shard that owns it).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

#[derive(Clone)]
pub(super) enum Conn {
    One(ConnectionManager),
    Cluster(ClusterConnection),
    /// A single connection without reconnection (`tollgate check`).
    Plain(redis::aio::MultiplexedConnection),
}

impl Conn {
    /// Connects to `url` (with `cluster`, a comma-separated list of the cluster's nodes to
    /// learn its slot map from), waiting at most `timeout` for a connection or an answer. A
    /// `rediss://` URL is verified against `ca` (PEM) when given, else the system's roots.
    pub(super) async fn open(url: &str, cluster: bool, timeout: Duration, ca: Option<&[u8]>) -> Result<Conn, String> {
        let certs = || redis::TlsCertificates { client_tls: None, root_cert: ca.map(<[u8]>::to_vec) };
        if cluster {
            let nodes: Vec<&str> = nodes(url).into_iter().filter(|n| !n.is_empty()).collect();
            let mut builder =
                redis::cluster::ClusterClient::builder(nodes).connection_timeout(timeout).response_timeout(timeout);
            if ca.is_some() {
                builder = builder.certs(certs());
            }
            let client = builder.build().map_err(|e| format!("limits.url: {e}"))?;
            let conn =
                client.get_async_connection().await.map_err(|e| format!("Redis Cluster at {}: {e}", redact(url)))?;
            return Ok(Conn::Cluster(conn));
        }
        let client = single(url, ca)?;
        // The first connection is made once, so a refusal (a wrong password, an untrusted
        // certificate) is said at start rather than retried; later ones reconnect by themselves.
        let mut first =
            client.get_multiplexed_async_connection().await.map_err(|e| format!("Redis at {}: {e}", redact(url)))?;
        redis::cmd("PING").query_async::<()>(&mut first).await.map_err(|e| format!("Redis at {}: {e}", redact(url)))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| format!("Redis at {}: {e}", redact(url)))?;
        Ok(Conn::One(conn))
    }
}

/// A client of one Redis: `rediss://` verified against `ca` (PEM) when given.
fn single(url: &str, ca: Option<&[u8]>) -> Result<redis::Client, String> {
    match ca {
        Some(ca) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates { client_tls: None, root_cert: Some(ca.to_vec()) },
        ),
        None => redis::Client::open(url),
    }
    .map_err(|e| format!("limits.url: {e}"))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::One(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::One(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::One(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
        }
    }
}

/// `url` without its credentials, for messages (each node of a cluster's list).
pub fn redact(url: &str) -> String {
    nodes(url).into_iter().map(redact_one).collect::<Vec<_>>().join(",")
}

/// The nodes of a list: split only where a comma starts another `redis://` or `rediss://` URL,
/// so a comma inside a password never splits one.
fn nodes(url: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in url.match_indices(',') {
        let next = url[i + 1..].trim_start();
        if i >= start && (next.starts_with("redis://") || next.starts_with("rediss://")) {
            out.push(url[start..i].trim());
            start = i + 1;
        }
    }
    out.push(url[start..].trim());
    out
}

fn redact_one(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return "<unparseable url>".into() };
    // Credentials end at the last `@` (a password may hold `/`, `?` or `,`; a host cannot hold
    // `@`); a query (`?password=`) is dropped too.
    let (scheme, rest) = (&url[..scheme_end], &url[scheme_end + 3..]);
    match rest.rfind('@') {
        Some(at) => format!("{scheme}://…@{}", rest[at + 1..].split('?').next().unwrap_or_default()),
        None => format!("{scheme}://{}", rest.split('?').next().unwrap_or_default()),
    }
}

/// Connects once and asks `PING` (with `cluster`, of the cluster: its slot map is read first):
/// what `tollgate check` reports. Returns the time it took.
pub fn ping(url: &str, cluster: bool, timeout: Duration, ca: Option<&[u8]>) -> Result<Duration, String> {
    let started = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let open = async {
            if cluster {
                return Conn::open(url, cluster, timeout, ca).await;
            }
            // One plain connection: its refusal is the answer, not retried.
            let client = single(url, ca)?;
            client.get_multiplexed_async_connection().await.map(Conn::Plain).map_err(|e| format!("{e}"))
        };
        let mut conn = tokio::time::timeout(timeout * 2, open)
            .await
            .map_err(|_| format!("no answer within {:?}", timeout * 2))??;
        let pong: String = redis::cmd("PING").query_async(&mut conn).await.map_err(|e| format!("{e}"))?;
        if pong != "PONG" {
            return Err(format!("PING answered {pong:?}"));
        }
        Ok(started.elapsed())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_kept_out_of_messages() {
        assert_eq!(redact("redis://:s3cret@r.internal:6379/0"), "redis://…@r.internal:6379/0");
        assert_eq!(redact("rediss://u:p@a:1, rediss://u:p@b:2"), "rediss://…@a:1,rediss://…@b:2");
        assert_eq!(redact("redis://r:6379/0?password=x"), "redis://r:6379/0");
        // Passwords that hold the separators: nothing of them shows.
        assert_eq!(redact("redis://:a,b@r:6379"), "redis://…@r:6379");
        assert_eq!(redact("redis://:p?q/w@r:6379/0"), "redis://…@r:6379/0");
        assert_eq!(redact("not a url"), "<unparseable url>");
        assert_eq!(nodes("redis://:a,b@r:1,redis://s:2"), ["redis://:a,b@r:1", "redis://s:2"]);
    }
}
