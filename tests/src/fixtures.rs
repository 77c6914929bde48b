//! The payload fixtures of `mdsec-common/tests/payloads` (hex, one file each, and
//! `index.txt`: name, IP protocol, service port, expected app).

pub fn load(name: &str) -> Vec<u8> {
    let path = format!("{}/../mdsec-common/tests/payloads/{name}.hex", env!("CARGO_MANIFEST_DIR"));
    let hex = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let hex = hex.trim();
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

/// (name, payload, protocol, service port) for every indexed fixture.
pub fn all() -> Vec<(String, Vec<u8>, u8, u16)> {
    let index = concat!(env!("CARGO_MANIFEST_DIR"), "/../mdsec-common/tests/payloads/index.txt");
    std::fs::read_to_string(index)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), load(f[0]), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect()
}
