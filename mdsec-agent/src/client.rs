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

pub fn get_json<T: DeserializeOwned>(addr: SocketAddr, path: &str) -> Result<T> {
    let body = get(addr, path)?;
    serde_json::from_slice(&body).with_context(|| format!("bad JSON from {path}"))
}

pub fn get(addr: SocketAddr, path: &str) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect to the agent at {addr} (is `mdsec-agent run` up?)"))?;
    request(&mut s, addr, path)
}

/// Sends one GET on an already connected stream (the tests connect from inside a
/// network namespace) and returns the body of a 200 answer.
pub fn request(s: &mut TcpStream, addr: SocketAddr, path: &str) -> Result<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("malformed HTTP answer")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head.lines().next().unwrap_or_default();
    let body = raw[split + 4..].to_vec();
    if !status.contains(" 200 ") {
        bail!("{path}: {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(body)
}
