//! The CLI's query commands are thin clients of the HTTP API. HTTP/1.0 keeps the
//! client a few lines: the server answers with a plain, length-delimited body.
//! Over TLS (rustls) when the API address is `https://`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    time::Duration,
};

use std::{path::Path, sync::Arc};

use anyhow::{Context, Result, bail};
use rustls::{
    ClientConfig, ClientConnection, StreamOwned,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use serde::de::DeserializeOwned;

/// Where the agent's API is, and how to speak TLS to it.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    tls: Option<(ServerName<'static>, Arc<ClientConfig>)>,
}

/// Files for an `https://` API: the CA that signed the agent's certificate,
/// and a client certificate if the agent asks for one.
#[derive(Default)]
pub struct TlsFiles<'a> {
    pub ca_file: Option<&'a Path>,
    pub client_cert: Option<&'a Path>,
    pub client_key: Option<&'a Path>,
}

/// `http://host:port`, `https://host:port` or `host:port` (plain HTTP).
pub fn parse_api(api: &str) -> Result<Endpoint> {
    parse_api_tls(api, &TlsFiles::default())
}

pub fn parse_api_tls(api: &str, files: &TlsFiles) -> Result<Endpoint> {
    let (https, hostport) = match api.strip_prefix("https://") {
        Some(h) => (true, h),
        None => (false, api.strip_prefix("http://").unwrap_or(api)),
    };
    let hostport = hostport.trim_end_matches('/');
    let addr = hostport
        .to_socket_addrs()
        .with_context(|| format!("bad API address {api}"))?
        .next()
        .with_context(|| format!("{api} resolves to nothing"))?;
    if !https {
        return Ok(Endpoint { addr, tls: None });
    }
    let ca = files
        .ca_file
        .with_context(|| format!("{api}: https needs --ca-file (the CA of the agent's certificate)"))?;
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read(ca)?) {
        roots.add(c.with_context(|| format!("{}: not a PEM certificate", ca.display()))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let cfg = match (files.client_cert, files.client_key) {
        (Some(c), Some(k)) => {
            let chain = CertificateDer::pem_slice_iter(&read(c)?)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("{}: not a PEM certificate", c.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&read(k)?)
                .with_context(|| format!("{}: not a PEM key", k.display()))?;
            b.with_client_auth_cert(chain, key)?
        }
        (None, None) => b.with_no_client_auth(),
        _ => bail!("--client-cert and --client-key go together"),
    };
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h).trim_matches(['[', ']']);
    let name =
        ServerName::try_from(host.to_string()).with_context(|| format!("{host}: not a server name"))?;
    Ok(Endpoint { addr, tls: Some((name, Arc::new(cfg))) })
}

/// A connection to the endpoint: plain, or TLS over it.
enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            // A server that closes without close_notify has still sent a
            // whole HTTP/1.0 answer; the end of the stream is the end of it.
            Conn::Tls(s) => match s.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
                r => r,
            },
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

impl Endpoint {
    fn connect(&self) -> Result<Conn> {
        let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .with_context(|| format!("connect to the agent at {} (is `mdsec-agent run` up?)", self.addr))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(match &self.tls {
            None => Conn::Plain(s),
            Some((name, cfg)) => {
                let c = ClientConnection::new(cfg.clone(), name.clone())?;
                Conn::Tls(Box::new(StreamOwned::new(c, s)))
            }
        })
    }
}

pub fn get_json<T: DeserializeOwned>(api: &Endpoint, path: &str, token: Option<&str>) -> Result<T> {
    let body = get(api, path, token)?;
    serde_json::from_slice(&body).with_context(|| format!("bad JSON from {path}"))
}

pub fn get(api: &Endpoint, path: &str, token: Option<&str>) -> Result<Vec<u8>> {
    Ok(get_page(api, path, token)?.0)
}

/// A GET of a list endpoint: the body and the next page's cursor
/// (`X-Next-Cursor`), if the server says more may follow.
pub fn get_page(api: &Endpoint, path: &str, token: Option<&str>) -> Result<(Vec<u8>, Option<String>)> {
    let mut s = api.connect()?;
    let (status, head, body) = exchange_head(&mut s, api.addr, "GET", path, token, None)?;
    Ok((ok(path, status, body)?, next_cursor(&head)))
}

/// The next page's cursor a list answer's head carries (`X-Next-Cursor`).
pub fn next_cursor(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("x-next-cursor").then(|| v.trim().to_string())
    })
}

/// Sends one GET on an already connected stream (the tests connect from inside a
/// network namespace) and returns the body of a 200 answer.
pub fn request(s: &mut TcpStream, addr: SocketAddr, path: &str) -> Result<Vec<u8>> {
    let (status, body) = exchange(s, addr, "GET", path, None)?;
    ok(path, status, body)
}

fn ok(path: &str, status: u16, body: Vec<u8>) -> Result<Vec<u8>> {
    if status != 200 {
        bail!("{path}: HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(body)
}

/// POSTs a JSON body; returns the status and the answer whatever the status.
pub fn post_json(
    api: &Endpoint,
    path: &str,
    token: Option<&str>,
    body: &serde_json::Value,
) -> Result<(u16, Vec<u8>)> {
    let mut s = api.connect()?;
    let (status, _, body) =
        exchange_head(&mut s, api.addr, "POST", path, token, Some(&serde_json::to_vec(body)?))?;
    Ok((status, body))
}

/// One request with an optional bearer token; returns the status and the body.
pub fn exchange(
    s: &mut TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, Vec<u8>)> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (status, _, body) = exchange_head(s, addr, method, path, token, None)?;
    Ok((status, body))
}

/// One request with an optional bearer token and JSON body; returns the
/// status, the response head (status line and headers) and the body.
pub fn exchange_head(
    s: &mut (impl Read + Write),
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> Result<(u16, String, Vec<u8>)> {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let content = body
        .map(|b| format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()))
        .unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n{auth}{content}\r\n")?;
    if let Some(b) = body {
        s.write_all(b)?;
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("malformed HTTP answer")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP status line")?;
    let head = head.into_owned();
    Ok((status, head, raw[split + 4..].to_vec()))
}
