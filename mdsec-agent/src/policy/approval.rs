//! Clinical change control of the policy directory: its content hash, the
//! approval file beside it (`approval.yaml`), the rule that decides whether a
//! change may be installed, and the difference between two generations that
//! the policy history records.
//!
//! What is approved is what is installed: the hash covers every policy file
//! (names and bytes, in name order) except the approval itself, and the
//! reloader checks the approval against the bytes it then loads.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use super::model::{APPROVAL_FILE, Diagnostic, MAX_FILE_BYTES, MAX_FILES, Policy};

/// The policy files of a directory, read once: their hash and their text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contents {
    /// `sha256:HEX` over (name, NUL, bytes, NUL) of every file in name order.
    pub hash: String,
    /// File name → text (lossy UTF-8; the loader refuses what is not UTF-8).
    pub files: BTreeMap<String, String>,
}

/// `sha256:HEX` of what `ctx` was fed.
fn sha256_text(ctx: ring::digest::Context) -> String {
    let hex: String = ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Reads the policy files of `dir` (`*.yaml`, `*.yml`; not the approval).
pub fn read(dir: &Path) -> anyhow::Result<Contents> {
    use anyhow::Context;
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| (n.ends_with(".yaml") || n.ends_with(".yml")) && n != APPROVAL_FILE)
        .collect();
    anyhow::ensure!(names.len() <= MAX_FILES, "{}: more than {MAX_FILES} policy files", dir.display());
    names.sort();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut files = BTreeMap::new();
    for n in names {
        let path = dir.join(&n);
        let len = std::fs::metadata(&path).with_context(|| format!("read {}", path.display()))?.len();
        anyhow::ensure!(
            len <= MAX_FILE_BYTES,
            "{}: {len} bytes; the limit is {MAX_FILE_BYTES}",
            path.display()
        );
        let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        ctx.update(n.as_bytes());
        ctx.update(&[0]);
        ctx.update(&bytes);
        ctx.update(&[0]);
        files.insert(n, String::from_utf8_lossy(&bytes).into_owned());
    }
    Ok(Contents { hash: sha256_text(ctx), files })
}

/// `approval.yaml`: who approved which content, under which ticket.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalYaml {
    /// The `sha256:` content hash approved (`mdsec-agent cutover-report` shows it).
    #[schemars(with = "String")]
    content_hash: Spanned<String>,
    /// Who approved (name, and role if wanted).
    #[schemars(with = "String")]
    approved_by: Spanned<String>,
    /// The change ticket.
    #[schemars(with = "String")]
    ticket: Spanned<String>,
    /// RFC 3339 time of the approval.
    #[schemars(with = "Option<String>")]
    approved_at: Option<Spanned<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub content_hash: String,
    pub approved_by: String,
    pub ticket: String,
    pub approved_at: Option<String>,
    /// Where `content_hash` is written (`approval.yaml:line:col`), for errors.
    #[serde(skip)]
    pub at: (u64, u64),
}

/// The approval file's JSON Schema (`deploy/schema/approval.schema.json`).
pub fn schema() -> String {
    serde_json::to_string_pretty(&schemars::schema_for!(ApprovalYaml)).unwrap() + "\n"
}

/// The approval beside the policy, if there is one; every problem located.
pub fn load(dir: &Path) -> Result<Option<Approval>, Vec<Diagnostic>> {
    let path = dir.join(APPROVAL_FILE);
    let err =
        |line, col, message: String| Diagnostic { file: path.clone(), line, col, message, warning: false };
    let text = match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(vec![err(0, 0, format!("cannot read: {e}"))]),
        Ok(b) if b.len() as u64 > MAX_FILE_BYTES => {
            return Err(vec![err(1, 1, format!("{} bytes; the limit is {MAX_FILE_BYTES}", b.len()))]);
        }
        Ok(b) => String::from_utf8(b).map_err(|_| vec![err(1, 1, "not valid UTF-8".into())])?,
    };
    let y: ApprovalYaml = serde_saphyr::from_str(&text).map_err(|e| {
        let (line, col) = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
        vec![err(line, col, crate::base::diag::saphyr_message(&e.to_string()))]
    })?;
    let mut errs = Vec::new();
    let at = |s: &Spanned<String>| (s.referenced.line(), s.referenced.column());
    let hash = y.content_hash.value.trim();
    if !(hash.len() == 71 && hash.starts_with("sha256:") && hash[7..].bytes().all(|b| b.is_ascii_hexdigit()))
    {
        let (l, c) = at(&y.content_hash);
        errs.push(err(l, c, format!("`{hash}` is not a content hash (`sha256:` and 64 hex digits)")));
    }
    for (name, v) in [("approved_by", &y.approved_by), ("ticket", &y.ticket)] {
        if v.value.trim().is_empty() {
            let (l, c) = at(v);
            errs.push(err(l, c, format!("`{name}` is empty")));
        }
    }
    if let Some(t) = &y.approved_at
        && t.value.parse::<jiff::Timestamp>().is_err()
    {
        let (l, c) = at(t);
        errs.push(err(l, c, format!("`{}` is not an RFC 3339 time", t.value)));
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Some(Approval {
        content_hash: hash.to_ascii_lowercase(),
        approved_by: y.approved_by.value.trim().to_string(),
        ticket: y.ticket.value.trim().to_string(),
        approved_at: y.approved_at.map(|t| t.value),
        at: at(&y.content_hash),
    }))
}

/// The text `mdsec-agent policy apply` writes (JSON strings are YAML scalars).
pub fn render(a: &Approval) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let mut t = String::from(
        "# The approval of this directory's policy content (mdsec-agent policy apply).\n\
         # It holds only for these exact files: any edit needs a new approval.\n",
    );
    t += &format!(
        "content_hash: {}\napproved_by: {}\nticket: {}\n",
        a.content_hash,
        q(&a.approved_by),
        q(&a.ticket)
    );
    if let Some(at) = &a.approved_at {
        t += &format!("approved_at: {}\n", q(at));
    }
    t
}

/// What the active generation was installed from.
pub struct Active<'a> {
    pub generation: u32,
    pub hash: &'a str,
    pub approved_by: Option<&'a str>,
    /// Did a segment of it require approval?
    pub requires_approval: bool,
}

/// Whether `proposed` (read as `contents` from `dir`) may be installed over
/// `active`. `Ok` carries the approval that covers it, if any; `Err` the
/// located reasons it is refused.
///
/// An approval is required when the content differs from the active
/// generation's and a segment of either policy requires it (so removing
/// `require_approval` is itself a change that needs one). With no active
/// generation (the first start), any content is a change.
pub fn decide(
    dir: &Path,
    active: Option<&Active>,
    proposed: &Policy,
    contents: &Contents,
    approval: Result<Option<Approval>, Vec<Diagnostic>>,
) -> Result<Option<Approval>, Vec<String>> {
    let mut requiring: Vec<String> =
        proposed.segments.iter().filter(|s| s.approval_required()).map(|s| format!("`{}`", s.name)).collect();
    if requiring.is_empty() && active.is_some_and(|a| a.requires_approval) {
        requiring.push("of the active generation".into());
    }
    let unchanged = active.is_some_and(|a| a.hash == contents.hash);
    let path = dir.join(APPROVAL_FILE);
    let keeps = || match active {
        Some(a) => format!(
            "generation {} ({}{}) stays active",
            a.generation,
            short(a.hash),
            a.approved_by.map(|b| format!(", approved by {b}")).unwrap_or_default()
        ),
        None => "no policy is installed".into(),
    };
    let how =
        format!("approve it with `mdsec-agent policy apply --approved-by NAME --ticket T {}`", dir.display());
    match approval {
        Err(diags) if !requiring.is_empty() && !unchanged => {
            let mut v: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
            v.push(format!("{}: the approval does not load; {}", path.display(), keeps()));
            Err(v)
        }
        // Not needed: a broken approval file is only noted by `check`.
        Err(_) => Ok(None),
        Ok(Some(a)) if a.content_hash == contents.hash => Ok(Some(a)),
        // Not needed; an approval of other content approves nothing.
        Ok(_) if requiring.is_empty() || unchanged => Ok(None),
        Ok(Some(a)) => Err(vec![format!(
            "{}:{}:{}: the approval is for {} but the policy files are now {}: segment {} requires approval \
             of every change; {how}; {}",
            path.display(),
            a.at.0,
            a.at.1,
            short(&a.content_hash),
            short(&contents.hash),
            requiring.join(", "),
            keeps()
        )]),
        Ok(None) => Err(vec![format!(
            "{}: the policy files changed ({}) and segment {} requires approval of every change, but there is \
             no {APPROVAL_FILE}; {how}; {}",
            dir.display(),
            short(&contents.hash),
            requiring.join(", "),
            keeps()
        )]),
    }
}

/// `sha256:` and the first 12 hex digits: enough to tell generations apart in a sentence.
pub fn short(hash: &str) -> &str {
    &hash[..hash.len().min(19)]
}

/// What changed from one generation to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Diff {
    pub files_added: Vec<String>,
    pub files_removed: Vec<String>,
    pub files_changed: Vec<String>,
    /// `segment: rule` lines (permanent rules; exceptions in their own lists).
    pub rules_added: Vec<String>,
    pub rules_removed: Vec<String>,
    pub exceptions_added: Vec<String>,
    pub exceptions_removed: Vec<String>,
}

/// Permanent rules, and exceptions and maintenance windows, of a policy as
/// `segment: rule` lines.
pub fn rule_lines(p: &Policy) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut rules, mut exceptions) = (BTreeSet::new(), BTreeSet::new());
    for r in &p.rules {
        let seg = p.segments.get(r.segment).map_or("?", |s| s.name.as_str());
        match (&r.exception, &r.window) {
            (Some(e), _) => {
                exceptions.insert(format!("{seg}: {} until {} ({})", r.text(), e.expires_text, e.ticket))
            }
            (None, Some(w)) => {
                exceptions.insert(format!("{seg}: {} during {} ({})", r.text(), w.text(), w.ticket))
            }
            (None, None) => rules.insert(format!("{seg}: {}", r.text())),
        };
    }
    (rules, exceptions)
}

/// What changed from the generation recorded as `old` to `new`.
pub fn diff(old: Option<&Change>, new: &Change) -> Diff {
    let files = |c: Option<&Change>| -> BTreeMap<String, String> {
        c.map(|c| c.files.iter().map(|f| (f.name.clone(), f.sha256.clone())).collect()).unwrap_or_default()
    };
    let (old_files, new_files) = (files(old), files(Some(new)));
    let set = |v: Option<&Vec<String>>| -> BTreeSet<String> { v.into_iter().flatten().cloned().collect() };
    let minus = |a: &BTreeSet<String>, b: &BTreeSet<String>| a.difference(b).cloned().collect::<Vec<_>>();
    let (old_rules, new_rules) = (set(old.map(|c| &c.rules)), set(Some(&new.rules)));
    let (old_exc, new_exc) = (set(old.map(|c| &c.exceptions)), set(Some(&new.exceptions)));
    Diff {
        files_added: new_files.keys().filter(|k| !old_files.contains_key(*k)).cloned().collect(),
        files_removed: old_files.keys().filter(|k| !new_files.contains_key(*k)).cloned().collect(),
        files_changed: new_files
            .iter()
            .filter(|(k, v)| old_files.get(*k).is_some_and(|o| o != *v))
            .map(|(k, _)| k.clone())
            .collect(),
        rules_added: minus(&new_rules, &old_rules),
        rules_removed: minus(&old_rules, &new_rules),
        exceptions_added: minus(&new_exc, &old_exc),
        exceptions_removed: minus(&old_exc, &new_exc),
    }
}

/// One file of a recorded generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FileRecord {
    pub name: String,
    /// `sha256:` of the file's bytes.
    pub sha256: String,
    /// The text; the API leaves it out unless asked (`?files=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// A row of the policy history: one installed generation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Change {
    /// Increases by one per row (the API's cursor).
    pub id: u64,
    pub time: String,
    pub generation: u32,
    pub content_hash: String,
    /// The generation's hash before this one (none at the first).
    pub previous_hash: Option<String>,
    pub policy_dir: String,
    /// `start`, `reload` or `restored` (the last installed generation,
    /// reinstalled from the history at a start that refused the files).
    pub cause: String,
    /// A segment of it requires approval of changes.
    pub requires_approval: bool,
    pub approved_by: Option<String>,
    pub ticket: Option<String>,
    pub approved_at: Option<String>,
    pub files: Vec<FileRecord>,
    /// The generation's permanent rules and exceptions as `segment: rule` lines.
    pub rules: Vec<String>,
    pub exceptions: Vec<String>,
    pub diff: Diff,
}

impl Change {
    /// The row of `policy` installed from `contents`, diffed against the
    /// generation recorded before it.
    pub fn new(
        contents: &Contents,
        previous: Option<&Change>,
        policy: &Policy,
        approval: Option<&Approval>,
    ) -> Change {
        let (rules, exceptions) = rule_lines(policy);
        let mut c = Change {
            content_hash: contents.hash.clone(),
            previous_hash: previous.map(|p| p.content_hash.clone()),
            approved_by: approval.map(|a| a.approved_by.clone()),
            ticket: approval.map(|a| a.ticket.clone()),
            approved_at: approval.and_then(|a| a.approved_at.clone()),
            files: contents
                .files
                .iter()
                .map(|(name, text)| FileRecord {
                    name: name.clone(),
                    sha256: {
                        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                        ctx.update(text.as_bytes());
                        sha256_text(ctx)
                    },
                    text: Some(text.clone()),
                })
                .collect(),
            rules: rules.into_iter().collect(),
            exceptions: exceptions.into_iter().collect(),
            requires_approval: policy.segments.iter().any(|s| s.approval_required()),
            ..Default::default()
        };
        c.diff = diff(previous, &c);
        c
    }

    /// The approval it was installed under, as the approval file said it.
    pub fn approval(&self) -> Option<Approval> {
        Some(Approval {
            content_hash: self.content_hash.clone(),
            approved_by: self.approved_by.clone()?,
            ticket: self.ticket.clone().unwrap_or_default(),
            approved_at: self.approved_at.clone(),
            at: (0, 0),
        })
    }

    /// The recorded files as read from a directory.
    pub fn contents(&self) -> Contents {
        Contents {
            hash: self.content_hash.clone(),
            files: self.files.iter().map(|f| (f.name.clone(), f.text.clone().unwrap_or_default())).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory, removed when dropped.
    struct Dir(std::path::PathBuf);
    impl Dir {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(files: &[(&str, &str)]) -> Dir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = Dir(std::env::temp_dir().join(format!("mdsec-approval-unit-{}-{n}", std::process::id())));
        std::fs::create_dir_all(d.path()).unwrap();
        for (n, t) in files {
            std::fs::write(d.path().join(n), t).unwrap();
        }
        d
    }

    const PUMPS: &str = "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nrequire_approval: true\nmembers:\n  - cidr: 10.0.1.0/24\nallow:\n  - to: 10.0.2.0/24\n    proto: tcp\n    ports: [2575]\n";

    fn loaded(d: &Path) -> (Policy, Contents) {
        let (p, diags) = super::super::model::load_dir(d, std::time::SystemTime::now());
        (p.unwrap_or_else(|| panic!("{diags:?}")), read(d).unwrap())
    }

    #[test]
    fn the_hash_covers_names_and_bytes_but_not_the_approval() {
        let a = dir(&[("pumps.yaml", PUMPS)]);
        let h = read(a.path()).unwrap().hash;
        std::fs::write(a.path().join(APPROVAL_FILE), "content_hash: x\n").unwrap();
        assert_eq!(read(a.path()).unwrap().hash, h, "the approval is not part of what it approves");
        let b = dir(&[("pump.yaml", PUMPS)]);
        assert_ne!(read(b.path()).unwrap().hash, h, "a renamed file is another content");
        let c = dir(&[("pumps.yaml", &PUMPS.replace("2575", "2576"))]);
        assert_ne!(read(c.path()).unwrap().hash, h);
    }

    #[test]
    fn a_change_needs_an_approval_of_exactly_its_hash() {
        let d = dir(&[("pumps.yaml", PUMPS)]);
        let (p, c) = loaded(d.path());
        // First start, no approval: refused, naming the command that approves.
        let e = decide(d.path(), None, &p, &c, load(d.path())).unwrap_err();
        assert!(e[0].contains("requires approval") && e[0].contains("policy apply"), "{e:?}");
        // An approval of another content: refused at the approval's hash.
        let other = Approval {
            content_hash: format!("sha256:{}", "ab".repeat(32)),
            approved_by: "B. Med".into(),
            ticket: "CHG-1".into(),
            approved_at: None,
            at: (0, 0),
        };
        std::fs::write(d.path().join(APPROVAL_FILE), render(&other)).unwrap();
        let e = decide(d.path(), None, &p, &c, load(d.path())).unwrap_err();
        assert!(e[0].contains("approval.yaml:3:15: the approval is for sha256:abababababab"), "{e:?}");
        // The right hash: approved, by whom and under which ticket.
        let ok = Approval { content_hash: c.hash.clone(), ..other };
        std::fs::write(d.path().join(APPROVAL_FILE), render(&ok)).unwrap();
        let got = decide(d.path(), None, &p, &c, load(d.path())).unwrap().unwrap();
        assert_eq!((got.approved_by.as_str(), got.ticket.as_str()), ("B. Med", "CHG-1"));
        // Unchanged content needs nothing, even with the approval gone.
        std::fs::remove_file(d.path().join(APPROVAL_FILE)).unwrap();
        let active = Active { generation: 1, hash: &c.hash, approved_by: None, requires_approval: true };
        assert_eq!(decide(d.path(), Some(&active), &p, &c, load(d.path())), Ok(None));
        // Dropping `require_approval` is itself a change the active policy guards.
        std::fs::write(d.path().join("pumps.yaml"), PUMPS.replace("require_approval: true\n", "")).unwrap();
        let (p2, c2) = loaded(d.path());
        assert!(decide(d.path(), Some(&active), &p2, &c2, load(d.path())).is_err());
        // Without any requiring segment, changes need no approval.
        let (p3, c3) = (p2.clone(), c2.clone());
        let free = Active { generation: 2, hash: "sha256:0", approved_by: None, requires_approval: false };
        assert_eq!(decide(d.path(), Some(&free), &p3, &c3, load(d.path())), Ok(None));
    }

    #[test]
    fn a_bad_approval_file_is_located() {
        let d = dir(&[("pumps.yaml", PUMPS)]);
        std::fs::write(
            d.path().join(APPROVAL_FILE),
            "content_hash: sha256:12\napproved_by: \"\"\nticket: T\nextra: 1\n",
        )
        .unwrap();
        let e = load(d.path()).unwrap_err();
        assert!(e[0].to_string().contains("approval.yaml:4:1"), "{e:?}");
        std::fs::write(
            d.path().join(APPROVAL_FILE),
            "content_hash: sha256:12\napproved_by: \"\"\nticket: T\n",
        )
        .unwrap();
        let e: Vec<String> = load(d.path()).unwrap_err().iter().map(|d| d.to_string()).collect();
        assert!(e[0].contains("approval.yaml:1:15") && e[0].contains("not a content hash"), "{e:?}");
        assert!(e[1].contains("approval.yaml:2:14") && e[1].contains("`approved_by` is empty"), "{e:?}");
    }

    #[test]
    fn the_diff_names_files_and_rules() {
        let a = dir(&[("pumps.yaml", PUMPS)]);
        let b = dir(&[
            ("pumps.yaml", &PUMPS.replace("2575", "2576")),
            ("zones.yaml", "zones:\n  x: [10.9.0.0/16]\n"),
        ]);
        let (pa, ca) = loaded(a.path());
        let (pb, cb) = loaded(b.path());
        let old = Change::new(&ca, None, &pa, None);
        assert_eq!(old.diff.files_added, ["pumps.yaml"], "the first generation adds everything");
        let d = Change::new(&cb, Some(&old), &pb, None).diff;
        assert_eq!(d.files_added, ["zones.yaml"]);
        assert_eq!(d.files_changed, ["pumps.yaml"]);
        assert_eq!(d.rules_added, ["pumps: to 10.0.2.0/24 tcp 2576"]);
        assert_eq!(d.rules_removed, ["pumps: to 10.0.2.0/24 tcp 2575"]);
    }
}
