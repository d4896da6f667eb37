//! The ceiling for any Pingora-based gateway on this machine: a pass-through proxy with no
//! features at all. `bare_pingora LISTEN UPSTREAM THREADS`.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use pingora_proxy::{ProxyHttp, Session};

struct Bare(std::net::SocketAddr);

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.0, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (listen, upstream) = (&args[1], args[2].parse().expect("UPSTREAM is IP:port"));
    let conf = ServerConf { threads: args.get(3).map_or(1, |t| t.parse().expect("THREADS")), ..Default::default() };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, Bare(upstream));
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
