//! Located diagnostics: one `file:line:col: message` type for every file the
//! operator writes (the agent config, the policy directory, the register),
//! with positions taken from the YAML parser's spans.

use std::{fmt, path::PathBuf};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based; 0 when the file could not be read at all.
    pub line: u64,
    pub col: u64,
    pub message: String,
    /// A warning does not make the file invalid.
    pub warning: bool,
}

impl Diagnostic {
    pub fn error(
        file: impl Into<PathBuf>,
        (line, col): (u64, u64),
        message: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic { file: file.into(), line, col, message: message.into(), warning: false }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.warning { "warning: " } else { "" };
        write!(f, "{}:{}:{}: {kind}{}", self.file.display(), self.line, self.col, self.message)
    }
}

impl std::error::Error for Diagnostic {}

/// serde-saphyr renders "error: line L column C: message" plus a snippet; keep the
/// message only, the location is printed in `file:line:col` form.
pub fn saphyr_message(rendered: &str) -> String {
    let first = rendered.lines().next().unwrap_or(rendered);
    let first = first.strip_prefix("error: ").unwrap_or(first);
    match first.split_once(": ") {
        Some((loc, msg)) if loc.starts_with("line ") => msg.to_string(),
        _ => first.to_string(),
    }
}

/// 1-based line and column of byte `off` in `bytes`.
pub fn line_col(bytes: &[u8], off: usize) -> (u64, u64) {
    let before = &bytes[..off.min(bytes.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = off - before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
    (line as u64, col as u64)
}

/// A YAML document as the parser saw it: every node with its position, so a
/// check on a value already deserialized can point at where it was written.
#[derive(Debug)]
pub struct Tree(Spanned<Node>);

#[derive(Debug)]
enum Node {
    Map(Vec<(String, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Scalar,
}

/// A step of a path into a [`Tree`]: a mapping key or a sequence index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

impl<'a> From<&'a str> for Step<'a> {
    fn from(k: &'a str) -> Step<'a> {
        Step::Key(k)
    }
}

impl From<usize> for Step<'_> {
    fn from(i: usize) -> Self {
        Step::Index(i)
    }
}

impl Tree {
    /// The tree of `text`, or None when it does not parse (the typed parse
    /// reports that error with its own location).
    pub fn parse(text: &str) -> Option<Tree> {
        serde_saphyr::from_str::<Spanned<Node>>(text).ok().map(Tree)
    }

    /// Where the value at `path` was written; where the deepest part of the
    /// path that exists was, if the rest is missing (a default applied); 1:1
    /// for an empty document.
    pub fn locate(&self, path: &[Step]) -> (u64, u64) {
        let pos = |s: &Spanned<Node>| (s.referenced.line().max(1), s.referenced.column().max(1));
        let mut at = &self.0;
        for step in path {
            let next = match (&at.value, step) {
                (Node::Map(m), Step::Key(k)) => m.iter().find(|(key, _)| key == k).map(|(_, v)| v),
                (Node::Seq(s), Step::Index(i)) => s.get(*i),
                _ => None,
            };
            match next {
                Some(n) => at = n,
                None => break,
            }
        }
        pos(at)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML node")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut m = Vec::new();
                while let Some(k) = a.next_key::<KeyText>()? {
                    m.push((k.0, a.next_value::<Spanned<Node>>()?));
                }
                Ok(Node::Map(m))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut s = Vec::new();
                while let Some(v) = a.next_element::<Spanned<Node>>()? {
                    s.push(v);
                }
                Ok(Node::Seq(s))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_none<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Node, D2::Error> {
                Node::deserialize(d)
            }
        }
        d.deserialize_any(V)
    }
}

/// A mapping key of any scalar type, as text.
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<KeyText, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(v.into()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_to_where_values_were_written() {
        let text = "# interfaces: in a comment first\napi:\n  listen: 0.0.0.0:1\ninterfaces:\n  - name: a\n    role: inline\n  - name: b\n";
        let t = Tree::parse(text).unwrap();
        assert_eq!(t.locate(&["api".into(), "listen".into()]), (3, 11));
        assert_eq!(t.locate(&["interfaces".into(), 1.into(), "name".into()]), (7, 11));
        // A missing key: where its parent is.
        assert_eq!(t.locate(&["api".into(), "token_file".into()]).0, 3);
    }
}
