//! Renders a [`Report`] as Markdown or as one self-contained HTML page (inline
//! CSS and SVG charts, no script, no external resource) that prints cleanly.

use std::fmt::Write as _;

use crate::evidence::report::{DeviceReport, Report, SegmentReport};

/// Colours of the chart series (also what the browser test looks for).
pub const COLOR_DROPPED: &str = "#c0392b";
pub const COLOR_WOULD_DROP: &str = "#e67e22";
pub const COLOR_LAG: &str = "#2c7fb8";

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Markdown table cells must not break the row.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// A duration for people: seconds, minutes, hours or days.
fn hours(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        7200..172_800 => format!("{:.1} h", secs as f64 / 3600.0),
        _ => format!("{:.1} d", secs as f64 / 86_400.0),
    }
}

fn pct(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}

pub fn markdown(r: &Report) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# Compensating controls for medical devices\n");
    let _ = writeln!(m, "Period {} to {} · generated {} by mdsec\n", r.from, r.to, r.generated);
    for c in &r.caveats {
        let _ = writeln!(m, "> **Note:** {c}\n");
    }
    let _ = writeln!(m, "## Program KPIs\n\n| KPI | Value |\n|---|---|");
    for (name, v) in kpi_rows(r) {
        let _ = writeln!(m, "| {name} | {v} |");
    }
    let _ = writeln!(m, "\n## Daily trend\n");
    trend_table(r).md(&mut m);
    let _ = writeln!(m, "\n## Segments");
    for s in &r.segments {
        segment_md(&mut m, s);
    }
    let _ = writeln!(m, "\n## Vulnerable devices\n");
    if r.vulnerable_devices.is_empty() {
        let _ = writeln!(m, "None in the register.");
    }
    for d in &r.vulnerable_devices {
        let _ = writeln!(
            m,
            "### {} {}\n\n{} · {} · class {} · segment {} ({}) · lifecycle {} · {}\n",
            d.mac,
            d.name.as_deref().unwrap_or(""),
            d.vendor.as_deref().unwrap_or("unknown vendor"),
            d.model.as_deref().unwrap_or("unknown model"),
            d.class,
            d.segment.as_deref().unwrap_or("none"),
            d.mode.as_deref().unwrap_or("-"),
            d.lifecycle,
            d.ips.join(", ")
        );
        cve_table(d).md(&mut m);
        let _ = writeln!(m, "\nControls:\n");
        for c in &d.controls {
            let _ = writeln!(m, "- {}", cell(c));
        }
        let _ = writeln!(
            m,
            "\nDenied flows {}, would-deny flows {}, detections {}.\n",
            d.denied_flows,
            d.would_deny_flows,
            d.detections.len()
        );
    }
    let _ = writeln!(m, "## Incidents\n");
    incident_table(r).md(&mut m);
    let _ = writeln!(m, "\n## Detections\n");
    detection_table(r).md(&mut m);
    let _ = writeln!(m, "\n## Lifecycle changes\n");
    lifecycle_table(r).md(&mut m);
    let _ = writeln!(m, "\n## Policy changes\n");
    policy_table(r).md(&mut m);
    m
}

fn segment_md(m: &mut String, s: &SegmentReport) {
    let _ = writeln!(
        m,
        "\n### {} — {} ({}, escalation: {})\n\nMode **{}**, default {}, members {}. Enforce {}, monitor {}. Packets allowed {}, dropped {}, would drop {}; violations {}.\n",
        s.name,
        s.function,
        s.clinical_impact,
        s.escalation,
        s.mode,
        s.default,
        s.members.join(", "),
        hours(s.enforce_secs),
        hours(s.monitor_secs),
        s.counts.allowed,
        s.counts.dropped,
        s.counts.would_drop,
        s.counts.violations
    );
    let _ = writeln!(m, "Allow-list:\n");
    for a in &s.allow {
        let _ = writeln!(m, "- `{a}`");
    }
    if !s.exceptions.is_empty() {
        let _ = writeln!(m);
        exception_table(s).md(m);
    }
}

/// A table both renderings print from the same cells, so the Markdown and the
/// HTML report cannot drift apart (they had: status names, a missing column).
pub(crate) struct Table {
    head: &'static [&'static str],
    pub(crate) rows: Vec<Row>,
    /// Index of a column printed as code.
    pub(crate) code: Option<usize>,
    /// A closing remark under the rows ("… and 12 earlier").
    pub(crate) note: Option<String>,
}

pub(crate) struct Row {
    /// HTML row class (the CVE status colours the row).
    pub(crate) class: Option<&'static str>,
    pub(crate) cells: Vec<String>,
}

impl Row {
    pub(crate) fn new(cells: Vec<String>) -> Row {
        Row { class: None, cells }
    }
}

impl Table {
    pub(crate) fn new(head: &'static [&'static str], rows: Vec<Row>) -> Table {
        Table { head, rows, code: None, note: None }
    }

    fn md(&self, m: &mut String) {
        let _ = writeln!(m, "| {} |\n|{}", self.head.join(" | "), "---|".repeat(self.head.len()));
        for r in &self.rows {
            let cells: Vec<String> = r
                .cells
                .iter()
                .enumerate()
                // GFM reads `\|` as a pipe inside code spans in tables too.
                .map(|(i, c)| if Some(i) == self.code { format!("`{}`", cell(c)) } else { cell(c) })
                .collect();
            let _ = writeln!(m, "| {} |", cells.join(" | "));
        }
        if let Some(n) = &self.note {
            let _ = writeln!(m, "\n{n}");
        }
    }

    pub(crate) fn html(&self, h: &mut String) {
        *h += "<table><thead><tr>";
        for c in self.head {
            let _ = write!(h, "<th>{}</th>", esc(c));
        }
        *h += "</tr></thead><tbody>";
        for r in &self.rows {
            match r.class {
                Some(c) => {
                    let _ = write!(h, "<tr class=\"{c}\">");
                }
                None => *h += "<tr>",
            }
            for (i, c) in r.cells.iter().enumerate() {
                if Some(i) == self.code {
                    let _ = write!(h, "<td><code>{}</code></td>", esc(c));
                } else {
                    let _ = write!(h, "<td>{}</td>", esc(c));
                }
            }
            *h += "</tr>";
        }
        if let Some(n) = &self.note {
            let _ = write!(h, "<tr><td colspan=\"{}\">{}</td></tr>", self.head.len(), esc(n));
        }
        *h += "</tbody></table>";
    }
}

fn trend_table(r: &Report) -> Table {
    let rows = r
        .trend
        .iter()
        .map(|d| {
            Row::new(vec![
                d.date.clone(),
                d.counts.dropped.to_string(),
                d.counts.would_drop.to_string(),
                d.counts.violations.to_string(),
                d.detections.to_string(),
                pct(d.unclassified_ratio),
                d.vulnerable_devices.to_string(),
                d.max_open_lag_days.to_string(),
                d.exceptions_active.to_string(),
            ])
        })
        .collect();
    Table::new(
        &[
            "Day",
            "Dropped",
            "Would drop",
            "Violations",
            "Detections",
            "Unclassified",
            "Vulnerable devices",
            "Max open lag (days)",
            "Exceptions",
        ],
        rows,
    )
}

fn exception_table(s: &SegmentReport) -> Table {
    let rows = s
        .exceptions
        .iter()
        .map(|e| {
            Row::new(vec![
                e.rule.clone(),
                e.expires.clone(),
                e.reason.clone(),
                e.ticket.clone(),
                if e.active { "yes" } else { "expired" }.into(),
            ])
        })
        .collect();
    Table { code: Some(0), ..Table::new(&["Exception", "Expires", "Reason", "Ticket", "In force"], rows) }
}

fn cve_table(d: &DeviceReport) -> Table {
    let rows = d
        .findings
        .iter()
        .map(|f| Row {
            class: Some(f.status.name()),
            cells: vec![
                f.cve.clone(),
                f.disclosed.clone(),
                f.patch_available.clone(),
                f.status.name().into(),
                f.lag_days.to_string(),
            ],
        })
        .collect();
    Table::new(&["CVE", "Disclosed", "Vendor patch", "Status", "Lag (days)"], rows)
}

fn detection_table(r: &Report) -> Table {
    let rows = r
        .detections
        .iter()
        .map(|e| {
            Row::new(vec![
                e.time.clone(),
                e.kind.clone(),
                e.segment.clone(),
                e.src.clone(),
                format!("{}:{}", e.dst, e.dport),
                e.clinical_impact.clone(),
                e.reason.clone(),
            ])
        })
        .collect();
    Table {
        note: (r.detections_not_listed > 0).then(|| format!("… and {} earlier", r.detections_not_listed)),
        ..Table::new(&["Time", "Type", "Segment", "From", "To", "Impact", "Reason"], rows)
    }
}

fn incident_table(r: &Report) -> Table {
    let rows = r
        .incidents
        .iter()
        .map(|i| {
            let kinds: Vec<String> = i.by_type.iter().map(|(k, n)| format!("{k} {n}")).collect();
            Row::new(vec![
                i.id.to_string(),
                i.first_seen.clone(),
                i.last_seen.clone(),
                i.state.clone(),
                i.src.clone(),
                i.targets_total.to_string(),
                i.clinical_impact.clone(),
                kinds.join(", "),
                i.escalation.clone(),
            ])
        })
        .collect();
    Table::new(
        &["Id", "Opened", "Last event", "State", "Source", "Targets", "Impact", "Events", "Escalation"],
        rows,
    )
}

fn lifecycle_table(r: &Report) -> Table {
    let rows = r
        .lifecycle_changes
        .iter()
        .map(|a| {
            Row::new(vec![
                a.time.clone(),
                a.mac.clone(),
                a.from.clone(),
                a.to.clone(),
                a.reason.clone(),
                a.actor.clone(),
            ])
        })
        .collect();
    Table::new(&["Time", "MAC", "From", "To", "Reason", "By"], rows)
}

fn policy_table(r: &Report) -> Table {
    let rows = r
        .policy_changes
        .iter()
        .map(|c| {
            let d = &c.diff;
            let mut what: Vec<String> = Vec::new();
            for (label, v) in [
                ("+", &d.rules_added),
                ("−", &d.rules_removed),
                ("+ exception", &d.exceptions_added),
                ("− exception", &d.exceptions_removed),
            ] {
                what.extend(v.iter().map(|x| format!("{label} {x}")));
            }
            if what.is_empty() {
                what.push(
                    if d.files_changed.is_empty() && d.files_added.is_empty() && d.files_removed.is_empty() {
                        "no change".into()
                    } else {
                        "files changed, rules the same".into()
                    },
                );
            }
            Row::new(vec![
                c.time.clone(),
                c.generation.to_string(),
                crate::policy::approval::short(&c.content_hash).to_string(),
                c.cause.clone(),
                c.approved_by.clone().unwrap_or_else(|| "not approved".into()),
                c.ticket.clone().unwrap_or_default(),
                what.join("; "),
            ])
        })
        .collect();
    Table::new(&["Time", "Generation", "Content", "Cause", "Approved by", "Ticket", "Change"], rows)
}

fn kpi_rows(r: &Report) -> Vec<(&'static str, String)> {
    let k = &r.program.end;
    let c = &r.program.counts;
    vec![
        ("Devices", k.devices.to_string()),
        ("Unclassified devices", format!("{} ({})", k.unclassified_devices, pct(k.unclassified_ratio))),
        ("Vulnerable devices (open CVEs)", k.vulnerable_devices.to_string()),
        ("End-of-life devices", k.end_of_life_devices.to_string()),
        ("Open (device, CVE) pairs", k.open_vulnerabilities.to_string()),
        ("Max open patch lag", format!("{} days", k.max_open_lag_days)),
        ("Mean lag of patched CVEs", format!("{:.0} days", k.mean_patched_lag_days)),
        ("Unauthorized protocol occurrences", c.violations.to_string()),
        ("Packets dropped", c.dropped.to_string()),
        ("Packets that would be dropped (monitor)", c.would_drop.to_string()),
        ("Policy exceptions in force", k.exceptions_active.to_string()),
        ("Detections", r.program.detections.values().sum::<u64>().to_string()),
        ("Time observed", hours(r.program.observed_secs)),
    ]
}

/// A bar chart: one group per label, one bar per series.
fn bars(title: &str, labels: &[String], series: &[(&str, &str, Vec<f64>)]) -> String {
    let (w, h, left, bottom, top) = (680.0, 240.0, 56.0, 40.0, 30.0);
    let max = series.iter().flat_map(|s| s.2.iter().copied()).fold(0.0f64, f64::max).max(1.0);
    let scale = nice(max);
    let plot_w = w - left - 16.0;
    let plot_h = h - bottom - top;
    let mut g = format!(
        "<svg viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"{}\">",
        esc(title)
    );
    let _ =
        write!(g, "<text x=\"{left}\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>", esc(title));
    for i in 0..=4 {
        let v = scale * i as f64 / 4.0;
        let y = top + plot_h - plot_h * i as f64 / 4.0;
        let _ = write!(
            g,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{}</text>",
            left + plot_w,
            left - 4.0,
            y + 3.0,
            fmt_num(v)
        );
    }
    let n = labels.len().max(1) as f64;
    let group = plot_w / n;
    let bw = (group * 0.8 / series.len().max(1) as f64).min(60.0);
    for (i, label) in labels.iter().enumerate() {
        let x0 = left + group * i as f64 + (group - bw * series.len() as f64) / 2.0;
        for (j, (_, color, vals)) in series.iter().enumerate() {
            let v = vals.get(i).copied().unwrap_or(0.0);
            let bh = plot_h * v / scale;
            let _ = write!(
                g,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{bh:.1}\" fill=\"{color}\"><title>{} {}</title></rect>",
                x0 + bw * j as f64,
                top + plot_h - bh,
                esc(label),
                fmt_num(v)
            );
        }
        let _ = write!(
            g,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
            left + group * (i as f64 + 0.5),
            top + plot_h + 14.0,
            esc(label)
        );
    }
    legend(&mut g, series.iter().map(|s| (s.0, s.1)), top + plot_h + 30.0, left);
    g += "</svg>";
    g
}

/// A line chart of one series per label.
fn line(title: &str, labels: &[String], name: &str, color: &str, vals: &[f64]) -> String {
    let (w, h, left, bottom, top) = (680.0, 220.0, 56.0, 40.0, 30.0);
    let scale = nice(vals.iter().copied().fold(0.0f64, f64::max).max(1.0));
    let plot_w = w - left - 16.0;
    let plot_h = h - bottom - top;
    let mut g = format!(
        "<svg viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"{}\">",
        esc(title)
    );
    let _ =
        write!(g, "<text x=\"{left}\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>", esc(title));
    for i in 0..=4 {
        let y = top + plot_h - plot_h * i as f64 / 4.0;
        let _ = write!(
            g,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{}</text>",
            left + plot_w,
            left - 4.0,
            y + 3.0,
            fmt_num(scale * i as f64 / 4.0)
        );
    }
    let n = labels.len().max(1) as f64;
    let pt = |i: usize, v: f64| (left + plot_w * (i as f64 + 0.5) / n, top + plot_h - plot_h * v / scale);
    let pts: Vec<String> = vals
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let (x, y) = pt(i, *v);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let _ = write!(
        g,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"3\"/>",
        pts.join(" ")
    );
    for (i, v) in vals.iter().enumerate() {
        let (x, y) = pt(i, *v);
        let _ = write!(
            g,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"6\" fill=\"{color}\"><title>{} {}</title></circle>",
            esc(&labels[i]),
            fmt_num(*v)
        );
        let _ = write!(
            g,
            "<text x=\"{x:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
            top + plot_h + 14.0,
            esc(&labels[i])
        );
    }
    legend(&mut g, [(name, color)].into_iter(), top + plot_h + 30.0, left);
    g += "</svg>";
    g
}

fn legend<'a>(g: &mut String, items: impl Iterator<Item = (&'a str, &'a str)>, y: f64, mut x: f64) {
    for (name, color) in items {
        let _ = write!(
            g,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{y:.1}\" font-size=\"11\">{}</text>",
            y - 10.0,
            x + 16.0,
            esc(name)
        );
        x += 24.0 + 7.0 * name.len() as f64;
    }
}

/// A round axis maximum at or above `v`.
fn nice(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v:.1}") }
}

pub fn html(r: &Report) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>mdsec evidence {} – {}</title><style>{CSS}</style></head><body>",
        esc(&r.from),
        esc(&r.to)
    );
    let _ = write!(
        h,
        "<header><h1>Compensating controls for medical devices</h1><p>Period <b>{}</b> to <b>{}</b> · generated {} by mdsec</p></header>",
        esc(&r.from),
        esc(&r.to),
        esc(&r.generated)
    );
    for c in &r.caveats {
        let _ = write!(h, "<p class=\"note\">{}</p>", esc(c));
    }
    h += "<section><h2>Program KPIs</h2><div class=\"tiles\">";
    for (name, v) in kpi_rows(r) {
        let _ = write!(
            h,
            "<div class=\"tile\"><div class=\"v\">{}</div><div class=\"k\">{}</div></div>",
            esc(&v),
            esc(name)
        );
    }
    h += "</div>";
    let labels: Vec<String> = r.trend.iter().map(|d| d.date.clone()).collect();
    h += "<div class=\"charts\">";
    h += &bars(
        "Denied packets per day",
        &labels,
        &[
            ("dropped (enforce)", COLOR_DROPPED, r.trend.iter().map(|d| d.counts.dropped as f64).collect()),
            (
                "would drop (monitor)",
                COLOR_WOULD_DROP,
                r.trend.iter().map(|d| d.counts.would_drop as f64).collect(),
            ),
        ],
    );
    h += &line(
        "Largest open patch lag (days)",
        &labels,
        "max open lag",
        COLOR_LAG,
        &r.trend.iter().map(|d| d.max_open_lag_days as f64).collect::<Vec<_>>(),
    );
    h += "</div>";
    trend_table(r).html(&mut h);
    h += "</section>";

    h += "<section><h2>Segments</h2><table><thead><tr><th>Segment</th><th>Function</th><th>Impact</th><th>Mode</th><th>Enforce</th><th>Allowed</th><th>Dropped</th><th>Would drop</th><th>Violations</th><th>Devices</th><th>Detections</th></tr></thead><tbody>";
    for s in &r.segments {
        let det: u64 = s.detections.values().sum();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} (default {})</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.name),
            esc(&s.function),
            esc(&s.clinical_impact),
            esc(&s.mode),
            esc(&s.default),
            hours(s.enforce_secs),
            s.counts.allowed,
            s.counts.dropped,
            s.counts.would_drop,
            s.counts.violations,
            s.devices,
            det
        );
    }
    h += "</tbody></table>";
    for s in &r.segments {
        let _ = write!(
            h,
            "<div class=\"seg\"><h3>{} <small>{} · members {}</small></h3><p>Escalation: {}</p><ul class=\"rules\">",
            esc(&s.name),
            esc(&s.function),
            esc(&s.members.join(", ")),
            esc(&s.escalation)
        );
        for a in &s.allow {
            let _ = write!(h, "<li><code>{}</code></li>", esc(a));
        }
        if s.allow.is_empty() {
            h += "<li>no allow rules</li>";
        }
        h += "</ul>";
        if !s.exceptions.is_empty() {
            exception_table(s).html(&mut h);
        }
        h += "</div>";
    }
    h += "</section><section><h2>Vulnerable devices</h2>";
    if r.vulnerable_devices.is_empty() {
        h += "<p>None in the register.</p>";
    }
    for d in &r.vulnerable_devices {
        let _ = write!(
            h,
            "<div class=\"dev\"><h3>{} {}</h3><p>{} · {} · class {} · segment <b>{}</b> ({}) · lifecycle {} · {}</p>",
            esc(&d.mac),
            esc(d.name.as_deref().unwrap_or("")),
            esc(d.vendor.as_deref().unwrap_or("unknown vendor")),
            esc(d.model.as_deref().unwrap_or("unknown model")),
            esc(&d.class),
            esc(d.segment.as_deref().unwrap_or("none")),
            esc(d.mode.as_deref().unwrap_or("-")),
            esc(&d.lifecycle),
            esc(&d.ips.join(", "))
        );
        cve_table(d).html(&mut h);
        h += "<ul>";
        for c in &d.controls {
            let _ = write!(h, "<li>{}</li>", esc(c));
        }
        let _ = write!(
            h,
            "</ul><p>Denied flows {}, would-deny flows {}, detections {}.</p></div>",
            d.denied_flows,
            d.would_deny_flows,
            d.detections.len()
        );
    }
    h += "</section><section><h2>Incidents</h2>";
    incident_table(r).html(&mut h);
    h += "</section><section><h2>Detections</h2>";
    detection_table(r).html(&mut h);
    h += "</section><section><h2>Lifecycle changes</h2>";
    lifecycle_table(r).html(&mut h);
    h += "</section><section><h2>Policy changes</h2>";
    policy_table(r).html(&mut h);
    h += "</section></body></html>\n";
    h
}

pub(crate) const CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;max-width:1100px}\
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;border-bottom:2px solid #333;padding-bottom:2px;margin-top:28px}\
h3{font-size:15px;margin:16px 0 4px}small{color:#666;font-weight:normal}\
table{border-collapse:collapse;width:100%;margin:8px 0;font-size:12px}th,td{border:1px solid #bbb;padding:3px 6px;text-align:left;vertical-align:top}\
th{background:#eee}tr.no-patch td,tr.end-of-life td{background:#fdecea}tr.open td{background:#fff4e0}\
.tiles{display:flex;flex-wrap:wrap;gap:8px}.tile{border:1px solid #bbb;border-radius:4px;padding:6px 10px;min-width:140px}\
.tile .v{font-size:18px;font-weight:bold}.tile .k{font-size:11px;color:#555}\
.charts{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}.note{background:#fff4e0;border-left:4px solid #e67e22;padding:6px}\
code{font-size:12px}.seg,.dev{break-inside:avoid}\
@media print{body{margin:0;max-width:none}section{break-before:auto}h2{break-after:avoid}tr,.tile,svg{break-inside:avoid}}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_table_prints_the_same_cells_in_both_renderings() {
        let t = Table {
            code: Some(0),
            note: Some("… and 3 earlier".into()),
            ..Table::new(
                &["Rule", "Reason"],
                vec![Row { class: Some("open"), cells: vec!["a|b".into(), "x < y".into()] }],
            )
        };
        let (mut m, mut h) = (String::new(), String::new());
        t.md(&mut m);
        t.html(&mut h);
        assert_eq!(m, "| Rule | Reason |\n|---|---|\n| `a\\|b` | x < y |\n\n… and 3 earlier\n");
        assert_eq!(
            h,
            "<table><thead><tr><th>Rule</th><th>Reason</th></tr></thead><tbody><tr class=\"open\"><td><code>a|b</code></td><td>x &lt; y</td></tr><tr><td colspan=\"2\">… and 3 earlier</td></tr></tbody></table>"
        );
    }
}
