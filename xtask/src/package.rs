//! `cargo xtask package`: `target/debian/mdsec_<version>_<arch>.deb`, built
//! with dpkg-deb from a staged tree (no debhelper: the package is one binary,
//! its unit, its configuration and its documentation).
//!
//! - `/usr/bin/mdsec-agent`, stripped, the eBPF object embedded;
//! - `/lib/systemd/system/mdsec-agent.service` (the hardened unit), not
//!   enabled or started: the operator edits `/etc/mdsec/mdsec.yaml` first;
//! - `/etc/mdsec/mdsec.yaml` and `/etc/mdsec/examples/` as conffiles;
//! - `/var/lib/mdsec`, man pages and bash/zsh/fish completions generated from
//!   the CLI, the copyright file and the docs.
//!
//! A purge removes the package's files and its empty directories; what the
//! operator wrote (policies, the state database with its evidence) stays.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{cargo, run};

const UNIT: &str = "mdsec-agent.service";

/// Builds the package; returns its path.
pub fn build(root: &Path) -> Result<PathBuf> {
    cargo(&["build", "--release", "-p", "mdsec-agent"])?;
    let version = workspace_version(root)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?.trim().to_string();
    let out = root.join("target/debian");
    let stage = out.join(format!("mdsec_{version}_{arch}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let dir = |p: &str| -> Result<PathBuf> {
        let d = stage.join(p);
        std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        Ok(d)
    };
    let bin = dir("usr/bin")?.join("mdsec-agent");
    std::fs::copy(root.join("target/release/mdsec-agent"), &bin)?;
    run(Command::new("strip")
        .args(["--strip-unneeded", "--remove-section=.comment", "--remove-section=.note"])
        .arg(&bin))?;

    let unit = std::fs::read_to_string(root.join("deploy").join(UNIT))?
        .replace("/usr/local/bin/mdsec-agent", "/usr/bin/mdsec-agent")
        .replace("(install as /etc/systemd/system/mdsec-agent.service)", "(installed by the mdsec package)");
    std::fs::write(dir("lib/systemd/system")?.join(UNIT), unit)?;

    let etc = dir("etc/mdsec")?;
    std::fs::copy(root.join("deploy/mdsec.yaml"), etc.join("mdsec.yaml"))?;
    copy_tree(&root.join("deploy/examples"), &dir("etc/mdsec/examples")?)?;
    dir("var/lib/mdsec")?;
    // The default event log's directory: `mdsec-agent check` wants a sink's
    // directory to exist (systemd's LogsDirectory would make it only at start).
    dir("var/log/mdsec")?;

    let man = dir("usr/share/man/man1")?;
    run(Command::new(&bin).arg("manpages").arg("--out").arg(&man).stdout(std::process::Stdio::null()))?;
    for e in std::fs::read_dir(&man)? {
        run(Command::new("gzip").args(["-9n"]).arg(e?.path()))?;
    }
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/mdsec-agent"),
        ("zsh", "usr/share/zsh/vendor-completions/_mdsec-agent"),
        ("fish", "usr/share/fish/vendor_completions.d/mdsec-agent.fish"),
    ] {
        let text = output(Command::new(&bin).args(["completions", shell]))?;
        let p = stage.join(path);
        std::fs::create_dir_all(p.parent().unwrap())?;
        std::fs::write(p, text)?;
    }

    let doc = dir("usr/share/doc/mdsec")?;
    std::fs::write(doc.join("copyright"), copyright())?;
    for f in ["README.md", "docs/OPERATIONS.md", "docs/POLICY.md", "docs/EVIDENCE.md"] {
        let src = root.join(f);
        if src.exists() {
            std::fs::copy(&src, doc.join(Path::new(f).file_name().unwrap()))?;
        }
    }
    let changelog = format!(
        "mdsec ({version}) unstable; urgency=medium\n\n  * Release {version}.\n\n -- mdsec maintainers <mdsec@example.org>  {}\n",
        output(Command::new("date").args(["-R", "-u", "-d", "@0"]))?.trim()
    );
    std::fs::write(doc.join("changelog"), changelog)?;
    run(Command::new("gzip").args(["-9n"]).arg(doc.join("changelog")))?;

    let debian = dir("DEBIAN")?;
    std::fs::write(debian.join("control"), control(&version, &arch, &libc_needed(&bin)?, &stage)?)?;
    let mut conffiles = String::from("/etc/mdsec/mdsec.yaml\n");
    for f in files(&stage.join("etc/mdsec/examples"))? {
        conffiles += &format!("/{}\n", f.strip_prefix(&stage)?.display());
    }
    std::fs::write(debian.join("conffiles"), conffiles)?;
    write_script(&debian.join("postrm"), POSTRM)?;
    let mut sums = String::new();
    for f in files(&stage)? {
        let rel = f.strip_prefix(&stage)?;
        if rel.starts_with("DEBIAN") {
            continue;
        }
        let md5 = output(Command::new("md5sum").arg(&f))?;
        sums += &format!("{}  {}\n", md5.split_whitespace().next().unwrap_or(""), rel.display());
    }
    std::fs::write(debian.join("md5sums"), sums)?;
    fix_modes(&stage)?;

    let deb = out.join(format!("mdsec_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&stage).arg(&deb))?;
    eprintln!("xtask package: {}", deb.display());
    Ok(deb)
}

/// Runs lintian on the package and prints its tags; fails on any error or
/// on a warning not justified in docs/PACKAGING.md.
pub fn lint(deb: &Path) -> Result<()> {
    let o = Command::new("lintian").args(["--tag-display-limit", "0", "--display-info"]).arg(deb).output()?;
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let tags: Vec<&str> = text.lines().filter(|l| l.len() > 2 && &l[1..3] == ": ").collect();
    for t in &tags {
        eprintln!("lintian: {t}");
    }
    let justified =
        std::fs::read_to_string(crate::workspace_root().join("docs/PACKAGING.md")).unwrap_or_default();
    let tag_name = |l: &str| l.split_whitespace().nth(2).unwrap_or("").to_string();
    let bad: Vec<&&str> = tags
        .iter()
        .filter(|l| l.starts_with("E: ") || (l.starts_with("W: ") && !justified.contains(&tag_name(l))))
        .collect();
    if !bad.is_empty() {
        bail!(
            "lintian: errors, or warnings not justified in docs/PACKAGING.md:\n{}",
            bad.iter().map(|l| l.to_string()).collect::<Vec<_>>().join("\n")
        );
    }
    eprintln!(
        "xtask package: lintian: 0 errors, {} warnings",
        tags.iter().filter(|l| l.starts_with("W: ")).count()
    );
    Ok(())
}

/// A clean Debian 12 (minbase plus systemd and procps, for the unit's
/// `systemd-analyze verify`) from the Debian mirror, made once with
/// debootstrap and cached as a tarball.
pub fn debian_base() -> Result<PathBuf> {
    let cache = Path::new("/var/cache/mdsec-xtask");
    let tar = cache.join("bookworm-minbase-systemd.tar");
    if tar.exists() {
        return Ok(tar);
    }
    std::fs::create_dir_all(cache)?;
    let dir = cache.join("bookworm.tmp");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let mirror = apt_mirror().unwrap_or_else(|| "http://deb.debian.org/debian".into());
    eprintln!("xtask setup: debootstrap bookworm from {mirror} (once, about a minute)");
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=systemd,procps", "bookworm"])
        .arg(&dir)
        .arg(&mirror)
        .stdout(std::process::Stdio::null()))?;
    let part = cache.join("bookworm.tar.part");
    run(Command::new("tar").arg("-C").arg(&dir).arg("-cf").arg(&part).arg("."))?;
    std::fs::rename(&part, &tar)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(tar)
}

/// The Debian mirror apt uses here (a `URIs:` line of deb822 sources, or a
/// `deb URL bookworm` line).
fn apt_mirror() -> Option<String> {
    let mut text = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    for e in std::fs::read_dir("/etc/apt/sources.list.d").ok()?.flatten() {
        text += &std::fs::read_to_string(e.path()).unwrap_or_default();
    }
    text.lines().find_map(|l| {
        let l = l.trim();
        let url = l
            .strip_prefix("URIs:")
            .map(str::trim)
            .or_else(|| l.strip_prefix("deb ")?.split_whitespace().find(|t| t.starts_with("http")))?;
        (url.ends_with("/debian") || url.ends_with("/debian/")).then(|| url.to_string())
    })
}

const POSTRM: &str = "#!/bin/sh
set -e
# On purge dpkg removes the conffiles; the directories go when empty. What the
# operator wrote there (policies, the state database with its evidence) stays.
if [ \"$1\" = purge ]; then
    rmdir --ignore-fail-on-non-empty /etc/mdsec/examples/policy /etc/mdsec/examples \\
        /etc/mdsec /var/lib/mdsec /var/log/mdsec 2>/dev/null || true
fi
exit 0
";

fn write_script(p: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(p, text)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// 0755 for directories and the binary, 0644 for the rest (a checkout's umask
/// must not leak into the package).
fn fix_modes(stage: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![stage.to_path_buf()];
    while let Some(d) = stack.pop() {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let exec = p.ends_with("usr/bin/mdsec-agent") || p.ends_with("DEBIAN/postrm");
                std::fs::set_permissions(
                    &p,
                    std::fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }),
                )?;
            }
        }
    }
    Ok(())
}

fn control(version: &str, arch: &str, libc: &str, stage: &Path) -> Result<String> {
    let kib = output(Command::new("du").args(["-sk", "--exclude=DEBIAN"]).arg(stage))?;
    let size = kib.split_whitespace().next().unwrap_or("0");
    Ok(format!(
        "Package: mdsec
Version: {version}
Architecture: {arch}
Maintainer: mdsec maintainers <mdsec@example.org>
Installed-Size: {size}
Depends: libc6 (>= {libc}), libgcc-s1 (>= 4.2), libssl3 (>= 3.0.0), zlib1g (>= 1:1.2.0)
Recommends: ieee-data
Section: net
Priority: optional
Homepage: https://example.org/mdsec
Description: network-layer security for hospital medical devices (XDP)
 mdsec runs on a Linux gateway in front of medical devices that cannot be
 patched or run agents. It discovers every device passively, classifies it by
 clinical function, enforces one allow-list per segment in XDP (monitor or
 enforce), detects deviations with their clinical impact, and keeps
 compensating-controls evidence. Prometheus metrics, a JSON API over TLS and
 syslog events feed the hospital's monitoring and SOC.
 .
 The service is installed but not enabled: edit /etc/mdsec/mdsec.yaml, run
 `mdsec-agent check` and `mdsec-agent doctor`, then enable mdsec-agent.service.
"
    ))
}

/// The newest glibc symbol version the binary needs (the `libc6` dependency).
fn libc_needed(bin: &Path) -> Result<String> {
    let syms = output(Command::new("objdump").arg("-T").arg(bin))?;
    let mut best = (2u32, 17u32);
    for v in syms.split("GLIBC_").skip(1) {
        let v: String = v.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        let mut it = v.split('.').filter_map(|p| p.parse::<u32>().ok());
        if let (Some(a), Some(b)) = (it.next(), it.next()) {
            best = best.max((a, b));
        }
    }
    Ok(format!("{}.{}", best.0, best.1))
}

fn copyright() -> String {
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: mdsec
Source: https://example.org/mdsec

Files: *
Copyright: 2026 the mdsec authors
License: Expat or Apache-2.0

Files: mdsec-ebpf/*
Copyright: 2026 the mdsec authors
License: GPL-2 or Expat
Comment: the XDP datapath, embedded in /usr/bin/mdsec-agent.

License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.

License: GPL-2
 On Debian systems the full text is in /usr/share/common-licenses/GPL-2.

License: Expat
 Permission is hereby granted, free of charge, to any person obtaining a copy
 of this software and associated documentation files (the \"Software\"), to deal
 in the Software without restriction, including without limitation the rights
 to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 copies of the Software, and to permit persons to whom the Software is
 furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in
 all copies or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
 SOFTWARE.
"
    .into()
}

fn workspace_version(root: &Path) -> Result<String> {
    let text = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let mut in_ws = false;
    for line in text.lines() {
        if line.starts_with('[') {
            in_ws = line.trim() == "[workspace.package]";
        } else if in_ws && let Some(v) = line.strip_prefix("version") {
            return Ok(v.trim_start_matches([' ', '=']).trim().trim_matches('"').to_string());
        }
    }
    bail!("no [workspace.package] version in Cargo.toml")
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            std::fs::create_dir_all(&dst)?;
            copy_tree(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), dst)?;
        }
    }
    Ok(())
}

fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() { stack.push(p) } else { out.push(p) }
        }
    }
    out.sort();
    Ok(out)
}

fn output(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).to_string())
}
