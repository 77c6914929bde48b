//! The CLI's query commands are thin clients of the HTTP API. HTTP/1.0 keeps the
//! client a few lines: the server answers with a plain, length-delimited body.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;

/// `http://host:port` or `host:port` → a socket address.
pub fn parse_api(api: &str) -> Result<SocketAddr> {
    let hostport = api.strip_prefix("http://").unwrap_or(api).trim_end_matches('/');
    if api.starts_with("https://") {
        bail!("{api}: the agent serves plain HTTP on loopback; use http://");
    }
    hostport
        .to_socket_addrs()
        .with_context(|| format!("bad API address {api}"))?
        .next()
        .with_context(|| format!("{api} resolves to nothing"))
}

pub fn get_json<T: DeserializeOwned>(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<T> {
    let body = get(addr, path, token)?;
    serde_json::from_slice(&body).with_context(|| format!("bad JSON from {path}"))
}

pub fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<Vec<u8>> {
    Ok(get_page(addr, path, token)?.0)
}

/// A GET of a list endpoint: the body and the next page's cursor
/// (`X-Next-Cursor`), if the server says more may follow.
pub fn get_page(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<(Vec<u8>, Option<String>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect to the agent at {addr} (is `mdsec-agent run` up?)"))?;
    let (status, head, body) = exchange_head(&mut s, addr, "GET", path, token, None)?;
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
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: &serde_json::Value,
) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect to the agent at {addr} (is `mdsec-agent run` up?)"))?;
    let (status, _, body) =
        exchange_head(&mut s, addr, "POST", path, token, Some(&serde_json::to_vec(body)?))?;
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
    let (status, _, body) = exchange_head(s, addr, method, path, token, None)?;
    Ok((status, body))
}

/// One request with an optional bearer token and JSON body; returns the
/// status, the response head (status line and headers) and the body.
pub fn exchange_head(
    s: &mut TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> Result<(u16, String, Vec<u8>)> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
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
