//! Test certificates: a CA, a server certificate for given addresses, a
//! client certificate, an expired server certificate and a stray key.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, date_time_ymd};

pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// Writes `ca.pem`, `server.pem`/`server.key` (valid for `ips`),
    /// `client.pem`/`client.key`, `expired.pem`/`expired.key` and `other.key`.
    pub fn new(dir: &Path, ips: &[&str]) -> Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text);
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: a leaf whose subject equals its issuer looks self-signed.
        ca.distinguished_name.push(DnType::CommonName, "mdsec test CA");
        write("ca.pem", ca.self_signed(&ca_key)?.pem())?;
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |name: &str, sans: Vec<String>, expired: bool| -> Result<()> {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(sans)?;
            p.distinguished_name.push(DnType::CommonName, format!("mdsec test {name}"));
            if expired {
                p.not_before = date_time_ymd(2020, 1, 1);
                p.not_after = date_time_ymd(2021, 1, 1);
            }
            write(&format!("{name}.pem"), p.signed_by(&key, &issuer)?.pem())?;
            write(&format!("{name}.key"), key.serialize_pem())?;
            Ok(())
        };
        let sans: Vec<String> = ips.iter().map(|s| s.to_string()).collect();
        leaf("server", sans.clone(), false)?;
        leaf("client", vec!["prometheus.example".into()], false)?;
        leaf("expired", sans, true)?;
        write("other.key", KeyPair::generate()?.serialize_pem())?;
        Ok(Pki { dir: dir.to_path_buf() })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}
