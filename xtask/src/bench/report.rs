//! Samples from the rounds, their medians and spreads, the ratios against the baselines, the
//! targets, and the two outputs: a markdown table (ratios first) and JSON.

use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::{json, Value};

/// Every round's value of every figure, by figure and series (`ambit`, `relay`, `direct`,
/// `ambit_notrace`, or a derived series such as `ambit_added`).
#[derive(Default)]
pub struct Samples(pub BTreeMap<String, BTreeMap<String, Vec<f64>>>);

#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

fn stat(v: &[f64]) -> Option<Stat> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let median = if s.len() % 2 == 1 { s[s.len() / 2] } else { (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0 };
    Some(Stat { median, min: s[0], max: s[s.len() - 1] })
}

impl Samples {
    pub fn add(&mut self, figure: &str, series: &str, v: f64) {
        self.0.entry(figure.to_string()).or_default().entry(series.to_string()).or_default().push(v);
    }

    pub fn get(&self, figure: &str, series: &str) -> Option<Stat> {
        self.0.get(figure).and_then(|m| m.get(series)).and_then(|v| stat(v))
    }

    /// Per-round ratio `a / b` of two series of one figure (rounds pair up in order).
    pub fn ratio(&self, figure: &str, a: &str, b: &str) -> Option<Stat> {
        let m = self.0.get(figure)?;
        let (x, y) = (m.get(a)?, m.get(b)?);
        let r: Vec<f64> = x.iter().zip(y).filter(|(_, y)| **y > 0.0).map(|(x, y)| x / y).collect();
        stat(&r)
    }
}

/// A target from the issue, checked against this run's figures.
pub struct Target {
    pub what: String,
    pub value: Option<f64>,
    pub goal: String,
    pub met: Option<bool>,
}

fn fmt(s: Option<Stat>, digits: usize) -> String {
    match s {
        Some(s) => format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits),
        None => "-".into(),
    }
}

/// One row of the main table: a figure with a unit, its series, and the ratios.
pub struct Row {
    pub label: String,
    pub figure: String,
    pub unit: &'static str,
    pub digits: usize,
    /// Ratios shown first: (header, numerator series, denominator series).
    pub ratios: Vec<(&'static str, &'static str, &'static str)>,
    pub series: Vec<&'static str>,
}

pub fn markdown(samples: &Samples, rows: &[Row], targets: &[Target], meta: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# ambit benchmark\n");
    let _ = writeln!(
        out,
        "{} alternating rounds; each cell: median (min–max). Ratios are per round, then the median. {}\n",
        meta["rounds"],
        meta["note"].as_str().unwrap_or("")
    );
    let _ = writeln!(out, "## Targets\n\n| target | this run | goal | met |\n|---|---|---|---|");
    for t in targets {
        let v = t.value.map_or("-".into(), |v| format!("{v:.3}"));
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        let _ = writeln!(out, "| {} | {v} | {} | {met} |", t.what, t.goal);
    }
    let _ = writeln!(
        out,
        "\n## Figures\n\n| figure | ratios | ambit | relay | direct | other |\n|---|---|---|---|---|---|"
    );
    for r in rows {
        let ratios: Vec<String> = r
            .ratios
            .iter()
            .map(|(h, a, b)| format!("{h} {}", fmt(samples.ratio(&r.figure, a, b), 2)))
            .collect();
        let cell = |series: &str| {
            if r.series.contains(&series) {
                fmt(samples.get(&r.figure, series), r.digits)
            } else {
                "-".into()
            }
        };
        let other: Vec<String> = r
            .series
            .iter()
            .filter(|s| !["ambit", "relay", "direct"].contains(s))
            .map(|s| format!("{s}: {}", fmt(samples.get(&r.figure, s), r.digits)))
            .collect();
        let _ = writeln!(
            out,
            "| {} ({}) | {} | {} | {} | {} | {} |",
            r.label,
            r.unit,
            ratios.join("<br>"),
            cell("ambit"),
            cell("relay"),
            cell("direct"),
            other.join("<br>")
        );
    }
    out
}

pub fn json(samples: &Samples, targets: &[Target], meta: &Value) -> Value {
    let mut figures = serde_json::Map::new();
    for (figure, series) in &samples.0 {
        let mut m = serde_json::Map::new();
        for (name, values) in series {
            let s = stat(values);
            m.insert(
                name.clone(),
                json!({"values": values, "median": s.map(|s| s.median), "min": s.map(|s| s.min), "max": s.map(|s| s.max)}),
            );
        }
        figures.insert(figure.clone(), Value::Object(m));
    }
    let targets: Vec<Value> = targets
        .iter()
        .map(|t| json!({"target": t.what, "value": t.value, "goal": t.goal, "met": t.met}))
        .collect();
    json!({"meta": meta, "targets": targets, "figures": figures})
}
