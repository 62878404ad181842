//! Raw sockets: HTTP/1.1 responses read off them, slow clients that drip their requests, and a websocket that never initialises.

use super::*;

/// One HTTP/1.1 response as read off a raw socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// `extensions.code` of the first error in a JSON error body.
    pub fn error_code(&self) -> Option<String> {
        self.json()?["errors"][0]["extensions"]["code"]
            .as_str()
            .map(str::to_owned)
    }
}

/// The response at the start of `bytes`, once it is all there (`eof`: the
/// server closed, which ends a body without a length).
pub fn parse_response(bytes: &[u8], eof: bool) -> Option<RawResponse> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let rest = &bytes[end + 4..];
    let header = |name: &str| {
        head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    };
    let body = if let Some(length) = header("content-length").and_then(|v| v.parse().ok()) {
        rest.get(..length)?.to_vec()
    } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if eof {
        rest.to_vec()
    } else {
        return None;
    };
    Some(RawResponse { status, head, body })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// Reads one response; the error says how the connection ended instead.
pub async fn read_response(
    stream: &mut (impl AsyncRead + Unpin),
    within: Duration,
) -> Result<RawResponse, String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => {
                return Err(format!(
                    "no whole response within {within:?} ({} bytes)",
                    received.len()
                ));
            }
            Ok(Ok(0)) => {
                return parse_response(&received, true).ok_or_else(|| {
                    format!("closed without a response ({} bytes)", received.len())
                });
            }
            Ok(Ok(n)) => {
                received.extend_from_slice(&buf[..n]);
                if let Some(response) = parse_response(&received, false) {
                    return Ok(response);
                }
            }
            Ok(Err(err)) => {
                return parse_response(&received, true)
                    .ok_or_else(|| format!("{err} after {} bytes", received.len()));
            }
        }
    }
}

/// How one slow client's connection went.
#[derive(Debug)]
pub struct SlowOutcome {
    /// When the server ended the connection, from the client's connect;
    /// `None` if it was still open when the test stopped watching.
    pub closed_after: Option<Duration>,
    /// The whole response the server sent, if one came.
    pub response: Option<RawResponse>,
    /// Bytes the client had sent.
    pub sent: usize,
}

/// Many connections that send `head` at once, then `drip` one byte per
/// interval, and notice when the server ends them.
pub struct SlowClients {
    /// The clients' local ports.
    pub ports: Vec<u16>,
    open: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
    clients: JoinSet<SlowOutcome>,
}

impl SlowClients {
    pub async fn connect(
        addr: SocketAddr,
        count: usize,
        head: &[u8],
        drip: &[u8],
        interval: Duration,
    ) -> Self {
        let open = Arc::new(AtomicUsize::new(0));
        let (stop, _) = watch::channel(false);
        let mut clients = JoinSet::new();
        let mut ports = Vec::new();
        for i in 0..count {
            let stream = TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("slow client {i} could not connect: {e}"));
            ports.push(stream.local_addr().expect("local address").port());
            open.fetch_add(1, Ordering::SeqCst);
            clients.spawn(slow_client(
                stream,
                head.to_vec(),
                drip.to_vec(),
                interval,
                stop.subscribe(),
                open.clone(),
            ));
        }
        Self {
            ports,
            open,
            stop,
            clients,
        }
    }

    /// Connections the server has not ended yet.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Stops the clients still going; every client's outcome.
    pub async fn finish(mut self) -> Vec<SlowOutcome> {
        let _ = self.stop.send(true);
        let mut outcomes = Vec::new();
        while let Some(outcome) = self.clients.join_next().await {
            outcomes.push(outcome.expect("slow client task"));
        }
        outcomes
    }
}

async fn slow_client(
    stream: TcpStream,
    head: Vec<u8>,
    drip: Vec<u8>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    open: Arc<AtomicUsize>,
) -> SlowOutcome {
    let started = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let mut sent = 0;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let mut drip = drip.into_iter();
    let mut ticker = tokio::time::interval(interval);
    let mut closed = writer.write_all(&head).await.is_err();
    if !closed {
        sent += head.len();
    }
    while !closed {
        tokio::select! {
            _ = async { stop.wait_for(|stop| *stop).await.map(|_| ()) } => {
                return SlowOutcome {
                    closed_after: None,
                    response: parse_response(&received, false),
                    sent,
                };
            }
            _ = ticker.tick() => {
                if let Some(byte) = drip.next() {
                    if writer.write_all(&[byte]).await.is_err() {
                        closed = true;
                    } else {
                        sent += 1;
                    }
                }
            }
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => closed = true,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            },
        }
    }
    open.fetch_sub(1, Ordering::SeqCst);
    SlowOutcome {
        closed_after: Some(started.elapsed()),
        response: parse_response(&received, true),
        sent,
    }
}

/// How a websocket upgrade went.
pub enum Upgrade {
    /// 101: the socket is open; the task ends with the close code the server
    /// sent (`None`: closed without a code) and when.
    Open(tokio::task::JoinHandle<(Option<u16>, Instant)>),
    /// The server answered the upgrade with this status and body.
    Refused(u16, Option<Value>),
    /// Anything else (a reset, a timeout).
    Failed(String),
}

/// Opens a `graphql-transport-ws` socket and never sends `connection_init`.
pub async fn open_uninitialised_socket(ws_url: &str) -> Upgrade {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::{Error, Message, http::HeaderValue};

    let mut request = ws_url.into_client_request().expect("a websocket url");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("graphql-transport-ws"),
    );
    let connect = tokio_tungstenite::connect_async(request);
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Err(_) => Upgrade::Failed("no answer to the upgrade within 5 s".into()),
        Ok(Err(Error::Http(response))) => {
            let body = response
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok());
            Upgrade::Refused(response.status().as_u16(), body)
        }
        Ok(Err(err)) => Upgrade::Failed(err.to_string()),
        Ok(Ok((mut socket, _))) => Upgrade::Open(tokio::spawn(async move {
            while let Some(message) = socket.next().await {
                match message {
                    Ok(Message::Close(frame)) => {
                        return (frame.map(|f| u16::from(f.code)), Instant::now());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            (None, Instant::now())
        })),
    }
}
