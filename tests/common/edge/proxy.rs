//! A TCP proxy between taskql and its database that a test can make refuse, blackhole or partition, and database URLs pointed through it.

use super::*;

/// What the proxy in front of the database does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forwards every connection.
    Forward,
    /// Drops every connection and closes its port: connects are refused.
    Refuse,
    /// Drops every connection; accepts new ones but never forwards a byte.
    Blackhole,
    /// A network partition: connections stay open but go silent, and new
    /// ones are accepted and never forwarded.
    Partition,
}

/// A TCP proxy between taskql and its database, which the test can cut.
/// Connections accepted while cut are forwarded once it is restored, as a
/// healed network would deliver them.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<ProxyMode>,
}

impl Proxy {
    /// A proxy on a free local port, forwarding to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, modes) = watch::channel(ProxyMode::Forward);
        tokio::spawn(run_proxy(listener, addr, target.to_owned(), modes));
        Self { addr, mode }
    }

    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }
}

async fn run_proxy(
    listener: TcpListener,
    addr: SocketAddr,
    target: String,
    mut modes: watch::Receiver<ProxyMode>,
) {
    let mut listener = Some(listener);
    let mut forwarders = JoinSet::new();
    let mut held: Vec<TcpStream> = Vec::new();
    let (frozen, _) = watch::channel(false);
    loop {
        let accept = async {
            match &listener {
                Some(listener) => listener.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = modes.changed() => {
                if changed.is_err() {
                    return; // the test dropped the proxy
                }
                let mode = *modes.borrow_and_update();
                match mode {
                    ProxyMode::Refuse => {
                        forwarders.abort_all();
                        held.clear();
                        listener = None;
                    }
                    ProxyMode::Blackhole => {
                        forwarders.abort_all();
                    }
                    ProxyMode::Partition => {
                        frozen.send_replace(true);
                    }
                    ProxyMode::Forward => {
                        // Silent connections end; the held ones go through.
                        frozen.send_replace(false);
                        for client in held.drain(..) {
                            forwarders.spawn(forward(client, target.clone(), frozen.subscribe()));
                        }
                    }
                }
                if mode != ProxyMode::Refuse && listener.is_none() {
                    listener = Some(rebind(addr).await);
                }
            }
            accepted = accept => {
                let Ok((client, _)) = accepted else { continue };
                if *modes.borrow() == ProxyMode::Forward {
                    forwarders.spawn(forward(client, target.clone(), frozen.subscribe()));
                } else {
                    held.push(client);
                }
            }
            Some(_) = forwarders.join_next(), if !forwarders.is_empty() => {}
        }
    }
}

async fn rebind(addr: SocketAddr) -> TcpListener {
    for _ in 0..50 {
        if let Ok(listener) = TcpListener::bind(addr).await {
            return listener;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the proxy could not listen on {addr} again");
}

async fn forward(mut client: TcpStream, target: String, mut frozen: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(&target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = async { frozen.wait_for(|frozen| *frozen).await.map(|_| ()) } => {
            // Silent, not closed: both sockets stay open until the partition heals.
            let _ = frozen.wait_for(|frozen| !*frozen).await;
        }
    }
}

/// The `host:port` a database URL names (PostgreSQL's port by default).
pub fn host_port(url: &str) -> String {
    let (_, authority, _) = split_url(url);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    match host_port.rsplit_once(':') {
        Some((_, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            host_port.to_owned()
        }
        _ => format!("{host_port}:5432"),
    }
}

/// `url` with its `host:port` replaced by `addr`.
pub fn through(url: &str, addr: SocketAddr) -> String {
    let (scheme, authority, path) = split_url(url);
    let user = authority
        .rsplit_once('@')
        .map_or(String::new(), |(user, _)| format!("{user}@"));
    format!("{scheme}://{user}{addr}{path}")
}

fn split_url(url: &str) -> (&str, &str, &str) {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    (scheme, authority, path)
}
