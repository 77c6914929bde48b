//! The Debian package in a clean Debian 12: installed with dpkg into a chroot
//! that debootstrap made from the Debian mirror (`cargo xtask test` builds
//! the package and caches the chroot's tarball, and names both in
//! `MDSEC_DEB` and `MDSEC_DEBIAN_BASE`). The CLI runs from the package, the
//! unit verifies, and a purge leaves exactly what the operator wrote.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The chroot, removed when dropped (also on panic).
struct Root(PathBuf);

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn env_path(name: &str) -> PathBuf {
    let p = std::env::var_os(name).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{name} is not set: run this test through `cargo xtask test` (it builds the package and the Debian 12 base)")
    });
    assert!(p.exists(), "{name}={} does not exist", p.display());
    p
}

fn chroot(root: &Path, args: &[&str]) -> (bool, String) {
    let o = Command::new("chroot").arg(root).args(args).env("LC_ALL", "C").output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), text)
}

#[test]
fn the_package_installs_runs_verifies_and_purges_in_a_clean_debian_12() {
    let (deb, base) = (env_path("MDSEC_DEB"), env_path("MDSEC_DEBIAN_BASE"));
    let root = Root(std::env::temp_dir().join(format!("mdsec-t{}-debroot", std::process::id())));
    std::fs::create_dir_all(&root.0).unwrap();
    let st = Command::new("tar").arg("-C").arg(&root.0).arg("-xf").arg(&base).status().unwrap();
    assert!(st.success());
    let r = &root.0;
    let (ok, os) = chroot(r, &["cat", "/etc/debian_version"]);
    assert!(ok && os.starts_with("12."), "not Debian 12: {os}");
    std::fs::copy(&deb, r.join("tmp/mdsec.deb")).unwrap();

    let (ok, out) = chroot(r, &["dpkg", "-i", "/tmp/mdsec.deb"]);
    assert!(ok, "{out}");
    let (ok, out) = chroot(r, &["mdsec-agent", "--version"]);
    assert!(ok && out.starts_with("mdsec-agent "), "{out}");
    let (ok, out) = chroot(r, &["mdsec-agent", "check", "--config", "/etc/mdsec/mdsec.yaml"]);
    assert!(ok, "{out}");
    assert!(out.contains("/etc/mdsec/mdsec.yaml: ok"), "{out}");
    // The unit as systemd on that system sees it (its binaries, targets, keys).
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .arg("/lib/systemd/system/mdsec-agent.service")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Not enabled: nothing starts before the operator has configured it.
    assert!(!r.join("etc/systemd/system/multi-user.target.wants/mdsec-agent.service").exists());
    for f in [
        "usr/share/man/man1/mdsec-agent.1.gz",
        "usr/share/man/man1/mdsec-agent-flows.1.gz",
        "usr/share/bash-completion/completions/mdsec-agent",
        "usr/share/doc/mdsec/copyright",
        "etc/mdsec/examples/policy/infusion-pumps.yaml",
        "var/lib/mdsec",
    ] {
        assert!(r.join(f).exists(), "{f} missing");
    }
    let (ok, conf) = chroot(r, &["cat", "/var/lib/dpkg/info/mdsec.conffiles"]);
    assert!(
        ok && conf.contains("/etc/mdsec/mdsec.yaml") && conf.contains("/etc/mdsec/examples/register.yaml")
    );

    // What the operator writes: an edited config, a policy, the state database.
    let edited = std::fs::read_to_string(r.join("etc/mdsec/mdsec.yaml")).unwrap() + "# edited on site\n";
    std::fs::write(r.join("etc/mdsec/mdsec.yaml"), edited).unwrap();
    std::fs::create_dir_all(r.join("etc/mdsec/segments")).unwrap();
    std::fs::write(r.join("etc/mdsec/segments/pumps.yaml"), "segment: pumps\n").unwrap();
    std::fs::write(r.join("var/lib/mdsec/mdsec.db"), "evidence").unwrap();

    let (ok, out) = chroot(r, &["dpkg", "--purge", "mdsec"]);
    assert!(ok, "{out}");
    let (_, status) = chroot(r, &["dpkg-query", "-W", "-f=${Status}", "mdsec"]);
    assert!(!status.contains("ok installed") && !status.contains("config-files"), "{status}");
    for gone in [
        "usr/bin/mdsec-agent",
        "lib/systemd/system/mdsec-agent.service",
        "usr/share/man/man1/mdsec-agent.1.gz",
        "usr/share/doc/mdsec",
        "etc/mdsec/mdsec.yaml",
        "etc/mdsec/examples",
    ] {
        assert!(!r.join(gone).exists(), "{gone} left after purge");
    }
    for kept in ["etc/mdsec/segments/pumps.yaml", "var/lib/mdsec/mdsec.db"] {
        assert!(r.join(kept).exists(), "the operator's {kept} was removed");
    }
}
