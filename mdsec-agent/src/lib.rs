//! mdsec agent: loads the XDP datapath, polls its maps and serves what it counts.
//! See docs/ARCHITECTURE.md for the module map.
//!
//! The folders are layers, and data flows one way through them: `base` ←
//! `datapath` ← `policy` ← `inventory` ← `detection` ← `evidence` ←
//! `surfaces` ← the application (`config`, `run`, `cli`). A module uses only
//! its own layer and those to its left (the `layers` test checks it).

pub mod base;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod detection;
pub mod evidence;
pub mod inventory;
pub mod policy;
pub mod run;
pub mod surfaces;

#[cfg(test)]
mod layers {
    //! The layering stated above, checked on the source: every `crate::…`
    //! path names a module of the file's own layer or a lower one.

    use std::path::Path;

    const ORDER: &[&str] = &["base", "datapath", "policy", "inventory", "detection", "evidence", "surfaces"];

    /// A top-level module's layer; the application modules are above all.
    fn layer(module: &str) -> usize {
        ORDER.iter().position(|l| *l == module).unwrap_or(ORDER.len())
    }

    /// The top-level modules a source text names through `crate::`, grouped
    /// imports (`crate::{a::x, b}`) included.
    fn named(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // Top-level items of the group: the first name after `{` or a
                // comma at depth 0.
                let mut depth = 0;
                let mut start = true;
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            rest = &group[j..];
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => start = true,
                        c if start && (c.is_alphabetic() || c == '_') => {
                            let name: String =
                                group[j..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                            out.push(name);
                            start = false;
                        }
                        _ => {}
                    }
                }
            } else {
                out.push(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
            }
        }
        out
    }

    fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, files);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }

    #[test]
    fn modules_use_only_their_own_and_lower_layers() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&src, &mut files);
        let mut wrong = Vec::new();
        for f in &files {
            let rel = f.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            let text = std::fs::read_to_string(f).unwrap();
            for m in named(&text) {
                if layer(&m) > layer(&top) {
                    wrong.push(format!("{} uses crate::{m}", rel.display()));
                }
            }
        }
        assert!(files.len() > 40, "found only {} files", files.len());
        assert!(wrong.is_empty(), "upward uses:\n{}", wrong.join("\n"));
    }

    #[test]
    fn the_scanner_sees_grouped_and_plain_paths() {
        let t = "use crate::{base::clock, surfaces::{a, b}};\nlet x = crate::evidence::store::Store::open();";
        assert_eq!(named(t), ["base", "surfaces", "evidence"]);
    }
}
