//! The unix-socket event sink (`events.socket`): every event, and in EVE the
//! flow records, as one JSON line to a local socket another program listens
//! on, as Suricata's `unix_stream` / `unix_dgram` EVE outputs do (Logstash,
//! Vector, Tenzir and Filebeat's unix input read them). A consumer that is
//! not there yet, or goes away, is retried (1 s doubling to 60 s); records
//! meanwhile are counted as failed, never queued without bound.

use std::{
    io::Write,
    os::unix::net::{UnixDatagram, UnixStream},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::eve::Format;
use crate::base::net::Backoff;

/// `events.socket` in the configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SocketConfig {
    /// The listening socket's absolute path (the consumer creates it).
    pub path: PathBuf,
    /// `stream`: newline-delimited JSON over a stream socket; `dgram`: one
    /// record per datagram.
    #[serde(default)]
    pub mode: SocketMode,
    /// `native` or `eve`.
    #[serde(default)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SocketMode {
    #[default]
    Stream,
    Dgram,
}

enum Conn {
    Stream(UnixStream),
    Dgram(UnixDatagram),
}

pub struct SocketSink {
    pub cfg: SocketConfig,
    conn: Option<Conn>,
    backoff: Backoff,
}

impl SocketSink {
    /// Connects now if it can; a consumer that is not listening yet is
    /// connected to later.
    pub fn new(cfg: SocketConfig) -> SocketSink {
        let mut s = SocketSink { cfg, conn: None, backoff: Backoff::default() };
        let _ = s.connect();
        s
    }

    fn connect(&mut self) -> std::io::Result<()> {
        let path = &self.cfg.path;
        self.conn = Some(match self.cfg.mode {
            SocketMode::Stream => {
                let s = UnixStream::connect(path)?;
                // A consumer that stops reading must not stall the exporter.
                s.set_write_timeout(Some(Duration::from_secs(2)))?;
                Conn::Stream(s)
            }
            SocketMode::Dgram => {
                let s = UnixDatagram::unbound()?;
                s.connect(path)?;
                Conn::Dgram(s)
            }
        });
        self.backoff.connected();
        Ok(())
    }

    /// Sends `lines`: `n` records joined by newlines (no newline after the
    /// last). A stream gets them in one write; a datagram socket one each.
    pub fn send(&mut self, lines: &str) -> std::io::Result<()> {
        if self.conn.is_none() {
            if self.backoff.due().is_err() {
                return Err(std::io::Error::new(std::io::ErrorKind::NotConnected, "waiting to reconnect"));
            }
            if let Err(e) = self.connect() {
                self.fail();
                return Err(e);
            }
        }
        let r = match self.conn.as_mut().expect("connected above") {
            Conn::Stream(s) => s.write_all(lines.as_bytes()).and_then(|()| s.write_all(b"\n")),
            Conn::Dgram(s) => lines.split('\n').try_for_each(|l| s.send(l.as_bytes()).map(|_| ())),
        };
        if r.is_err() {
            self.fail();
        }
        r
    }

    fn fail(&mut self) {
        self.conn = None;
        self.backoff.failed();
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Read, os::unix::net::UnixListener};

    use super::*;

    #[test]
    fn a_stream_consumer_gets_lines_and_a_late_one_is_connected_to() {
        let dir = std::env::temp_dir().join(format!("mdsec-socket-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("eve.sock");
        let cfg = SocketConfig { path: path.clone(), mode: SocketMode::Stream, format: Format::Eve };
        let mut s = SocketSink::new(cfg);
        assert!(s.send("{\"a\":1}").is_err(), "nobody listens yet");
        let l = UnixListener::bind(&path).unwrap();
        // The retry waits out its backoff, then connects.
        s.backoff.expire();
        s.send("{\"a\":2}\n{\"a\":3}").unwrap();
        drop(s);
        let (mut c, _) = l.accept().unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert_eq!(got, "{\"a\":2}\n{\"a\":3}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_datagram_consumer_gets_one_record_per_datagram() {
        let dir = std::env::temp_dir().join(format!("mdsec-socket-dgram-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("eve.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        let cfg = SocketConfig { path: path.clone(), mode: SocketMode::Dgram, format: Format::Native };
        let mut s = SocketSink::new(cfg);
        s.send("{\"a\":1}\n{\"b\":2}").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"{\"a\":1}");
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"{\"b\":2}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
