//! `mdsec-agent fleet`: the merged view of every site, read from the Kafka
//! topics the gateways produce (docs/FLEET.md).

use std::time::Duration;

use anyhow::{Result, bail};

use super::table;
use crate::surfaces::kafka::{
    consume::{Source, snapshot},
    fleet::Filter,
};

pub struct FleetArgs {
    pub brokers: String,
    pub inventory_topic: String,
    pub events_topic: String,
    pub client: Vec<String>,
    pub show: String,
    pub filter: Filter,
    pub limit: usize,
    pub offset: usize,
    pub json: bool,
}

pub fn run(a: FleetArgs) -> Result<std::process::ExitCode> {
    let mut client = Vec::new();
    for kv in &a.client {
        let Some((k, v)) = kv.split_once('=') else { bail!("--client {kv}: expected PROPERTY=VALUE") };
        client.push((k.to_string(), v.to_string()));
    }
    let events = a.show == "incidents";
    let src = Source {
        brokers: a.brokers.clone(),
        inventory_topic: a.inventory_topic.clone(),
        events_topic: events.then(|| a.events_topic.clone()),
        client,
        timeout: Duration::from_secs(10),
    };
    let view = snapshot(&src)?;
    let page = |n: usize| a.offset.min(n)..(a.offset + a.limit).min(n);
    match a.show.as_str() {
        "devices" => {
            let all = view.devices(&a.filter);
            let items = &all[page(all.len())];
            table::print(
                a.json,
                items,
                &["SITE", "GATEWAY", "MAC", "CLASS", "VENDOR", "IPS", "STATE", "LAST SEEN"],
                |d| {
                    vec![
                        d.site.clone(),
                        d.gateway.clone(),
                        d.device.mac.clone(),
                        d.device.class.clone(),
                        d.device.vendor.clone().unwrap_or_default(),
                        d.device.ips.join(","),
                        d.device.lifecycle.clone(),
                        d.device.last_seen.clone(),
                    ]
                },
            )?;
        }
        "sites" => {
            let all: Vec<_> = view
                .sites()
                .into_iter()
                .filter(|s| a.filter.site.as_ref().is_none_or(|x| *x == s.site))
                .collect();
            table::print(
                a.json,
                &all[page(all.len())],
                &["SITE", "GATEWAYS", "DEVICES", "UNCLASSIFIED", "CLASSES"],
                |s| {
                    vec![
                        s.site.clone(),
                        s.gateways.len().to_string(),
                        s.devices.to_string(),
                        format!("{:.0}%", s.unclassified_share * 100.0),
                        s.by_class.iter().map(|(c, n)| format!("{c}:{n}")).collect::<Vec<_>>().join(" "),
                    ]
                },
            )?;
        }
        "moved" => {
            let all = view.moved();
            table::print(a.json, &all[page(all.len())], &["MAC", "SITES (OLDEST FIRST)"], |m| {
                vec![m.mac.clone(), m.sites.join(" → ")]
            })?;
        }
        "incidents" => {
            let mut all: Vec<_> = view.incidents().cloned().collect();
            all.reverse();
            if let Some(s) = &a.filter.site {
                all.retain(|v| v["site"].as_str() == Some(s));
            }
            table::print(a.json, &all[page(all.len())], &["SITE", "GATEWAY", "TIME", "SIGNATURE"], |v| {
                let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                let sig = v["alert"]["signature"]
                    .as_str()
                    .or(v["message"].as_str())
                    .unwrap_or_default()
                    .to_string();
                vec![
                    text("site"),
                    text("gateway"),
                    v["timestamp"].as_str().or(v["time"].as_str()).unwrap_or_default().into(),
                    sig,
                ]
            })?;
        }
        other => bail!("--show {other}: one of devices, sites, moved, incidents"),
    }
    if view.malformed > 0 {
        eprintln!("fleet: {} malformed messages skipped", view.malformed);
    }
    Ok(std::process::ExitCode::SUCCESS)
}
