//! A strict reader of the Prometheus text exposition, for assertions on `/metrics`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};

/// Samples keyed `name{label="value",…}` with labels sorted by name, so a test can
/// spell a series without knowing the encoder's label order.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub values: BTreeMap<String, f64>,
    /// Family names from `# TYPE` lines.
    pub families: BTreeSet<String>,
}

impl Samples {
    pub fn parse(text: &str) -> Result<Samples> {
        let mut s = Samples::default();
        for (n, line) in text.lines().enumerate() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                s.families.insert(rest.split_whitespace().next().context("TYPE without name")?.to_string());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').with_context(|| format!("line {}: {line}", n + 1))?;
            let value: f64 = value.parse().with_context(|| format!("line {}: bad value", n + 1))?;
            if s.values.insert(normalize(series)?, value).is_some() {
                bail!("line {}: duplicate series {series}", n + 1);
            }
        }
        Ok(s)
    }

    /// The value of one series (`name` or `name{a="x",b="y"}`, any label order).
    pub fn get(&self, series: &str) -> Option<f64> {
        self.values.get(&normalize(series).ok()?).copied()
    }

    /// Sum over every series of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.values
            .iter()
            .filter(|(k, _)| {
                let (n, l) = split(k);
                n == name && labels.iter().all(|(a, b)| l.contains(&format!("{a}=\"{b}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }

    pub fn series(&self) -> BTreeSet<String> {
        self.values.keys().cloned().collect()
    }
}

fn split(k: &str) -> (&str, &str) {
    match k.split_once('{') {
        Some((n, l)) => (n, l),
        None => (k, ""),
    }
}

fn normalize(series: &str) -> Result<String> {
    let Some((name, rest)) = series.split_once('{') else { return Ok(series.to_string()) };
    let body = rest.strip_suffix('}').context("unterminated labels")?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            bail!("label {key} without a quoted value");
        }
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => val.push(chars.next().context("dangling escape")?),
                '"' => break,
                c => val.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_string(), val));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    labels.sort();
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    Ok(format!("{name}{{{}}}", inner.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_order_does_not_matter() {
        let s = Samples::parse("# TYPE m counter\nm{b=\"2\",a=\"x\\\"y\"} 3\nn 1\n").unwrap();
        // Either label order names the series.
        assert_eq!(s.get("m{a=\"x\\\"y\",b=\"2\"}"), Some(3.0));
        assert_eq!(s.get("m{b=\"2\",a=\"x\\\"y\"}"), Some(3.0));
        assert_eq!(s.get("n"), Some(1.0));
        assert_eq!(s.sum("m", &[("b", "2")]), 3.0);
        assert!(Samples::parse("m 1\nm 2\n").is_err());
    }
}
