//! Helpers shared by meshd's macro benchmarks: running load generators inside test
//! namespaces and writing the side-by-side markdown table.

use std::{fmt::Write as _, path::Path};

use anyhow::{anyhow, bail, Context as _, Result};

/// One measured row: what ran, and its numbers.
#[derive(Clone, Debug)]
pub struct Row {
    /// Benchmark group, e.g. "HTTP via published port".
    pub group: String,
    /// The path measured, e.g. "meshd proxy".
    pub path: String,
    /// The main figure (higher is better).
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// A secondary figure, e.g. mean latency.
    pub detail: String,
    /// Whether this row is the group's baseline.
    pub baseline: bool,
}

/// Renders rows as a markdown table with each row's ratio to its group's baseline.
pub fn markdown(rows: &[Row]) -> String {
    let mut out =
        String::from("| benchmark | path | result | ratio to baseline | detail |\n|---|---|---|---|---|\n");
    for row in rows {
        let base = rows.iter().find(|r| r.group == row.group && r.baseline).map(|r| r.value);
        let ratio = match base {
            Some(b) if b > 0.0 => format!("{:.2}×", row.value / b),
            _ => "-".into(),
        };
        let path = if row.baseline { format!("{} (baseline)", row.path) } else { row.path.clone() };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} {} | {} | {} |",
            row.group, path, row.value, row.unit, ratio, row.detail
        );
    }
    out
}

/// Runs `program args` inside namespace `ns` and returns stdout.
pub fn in_ns(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    meshd_tests::sh("ip", &full)
        .with_context(|| format!("{program} in {ns}; install it with `make bootstrap`"))
}

/// wrk's requests per second and mean latency from its text output.
pub fn parse_wrk(out: &str) -> Result<(f64, String)> {
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow!("no Requests/sec in wrk output:\n{out}"))?;
    let latency = out
        .lines()
        .find(|l| l.trim_start().starts_with("Latency"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?")
        .to_owned();
    // Isolated errors happen on every path here, the direct baseline too (one read
    // error in ~50,000 requests); they are reported in the row. More than one in a
    // thousand means the path is broken: the benchmark stops.
    let errors = wrk_errors(out);
    let requests = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").map(|(n, _)| n.trim().parse::<u64>()))
        .and_then(Result::ok)
        .unwrap_or(0);
    if errors > 0 && errors * 1000 > requests {
        bail!("wrk saw {errors} errors in {requests} requests:\n{out}");
    }
    let errors = match errors {
        0 => String::new(),
        n => format!(", {n} errors in {requests} requests"),
    };
    Ok((rps, format!("mean latency {latency}{errors}")))
}

/// Socket errors plus non-2xx/3xx answers in wrk's output.
fn wrk_errors(out: &str) -> u64 {
    let numbers = |line: &str| -> u64 {
        line.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u64>().ok()).sum()
    };
    out.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Socket errors:") || l.starts_with("Non-2xx"))
        .map(|l| numbers(l.split_once(':').map_or("", |(_, rest)| rest)))
        .sum()
}

/// iperf3's received throughput in bits per second from its JSON output.
pub fn parse_iperf3(json: &str) -> Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("no sum_received in iperf3 output"))
}

/// Writes one benchmark group's table (with the date and its baseline rows, all from
/// the same run) to `benches/results/<key>.md`, and into README.md between the markers
/// `<!-- bench:<key>:start -->` and `<!-- bench:<key>:end -->` (added before
/// `<!-- bench:end -->` the first time). Groups run alone (`make bench ONLY=<key>`)
/// replace only their own section.
pub fn write_results(key: &str, title: &str, rows: &[Row]) -> Result<String> {
    let date = meshd_tests::sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?;
    let text = format!(
        "### {title}\n\nMeasured with `make bench ONLY={key}` on {} ({} cores), one run, baseline in the same run.\n\n{}",
        date.trim(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        markdown(rows)
    );
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = here.join("results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{key}.md"));
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    let readme = here.join("../README.md");
    let old = std::fs::read_to_string(&readme).with_context(|| format!("reading {}", readme.display()))?;
    let updated = replace_section(&old, key, &text)
        .ok_or_else(|| anyhow!("{} has no <!-- bench:end --> marker for the tables", readme.display()))?;
    std::fs::write(&readme, updated).with_context(|| format!("writing {}", readme.display()))?;
    Ok(text)
}

/// `readme` with group `key`'s section replaced by `text` (or inserted before the end
/// of the bench block). None when the bench block's end marker is missing.
pub fn replace_section(readme: &str, key: &str, text: &str) -> Option<String> {
    let (start, end) = (format!("<!-- bench:{key}:start -->"), format!("<!-- bench:{key}:end -->"));
    let section = format!("{start}\n{text}\n{end}");
    match (readme.find(&start), readme.find(&end)) {
        (Some(a), Some(b)) if a < b => Some(format!("{}{section}{}", &readme[..a], &readme[b + end.len()..])),
        _ => {
            let at = readme.find("<!-- bench:end -->")?;
            Some(format!("{}{section}\n\n{}", &readme[..at], &readme[at..]))
        }
    }
}

/// The median sample (by value), sorting `runs` in place.
pub fn median(runs: &mut [(f64, String)]) -> (f64, String) {
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    runs[runs.len() / 2].clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_relative_to_the_group_baseline() {
        let row = |path: &str, value: f64, baseline: bool| Row {
            group: "g".into(),
            path: path.into(),
            value,
            unit: "req/s".into(),
            detail: String::new(),
            baseline,
        };
        let table = markdown(&[row("direct", 200.0, true), row("meshd", 150.0, false)]);
        assert!(table.contains("| g | direct (baseline) | 200 req/s | 1.00× |"), "{table}");
        assert!(table.contains("| g | meshd | 150 req/s | 0.75× |"), "{table}");
    }

    #[test]
    fn a_group_replaces_only_its_own_section() {
        let readme = "intro\n<!-- bench:start -->\n<!-- bench:end -->\nrest\n";
        let one = replace_section(readme, "netlink", "table A").unwrap();
        let two = replace_section(&one, "mesh", "table B").unwrap();
        let three = replace_section(&two, "netlink", "table C").unwrap();
        assert!(
            three.contains("<!-- bench:netlink:start -->\ntable C\n<!-- bench:netlink:end -->"),
            "{three}"
        );
        assert!(three.contains("table B") && !three.contains("table A"), "{three}");
        assert!(three.ends_with("<!-- bench:end -->\nrest\n"), "{three}");
        assert!(replace_section("no markers", "x", "t").is_none());
    }

    #[test]
    fn parses_wrk_output() {
        let out = "Running 5s test\n  Thread Stats   Avg      Stdev\n    Latency   1.20ms  0.3ms\nRequests/sec:  12345.67\n";
        let (rps, detail) = parse_wrk(out).unwrap();
        assert_eq!(rps, 12345.67);
        assert_eq!(detail, "mean latency 1.20ms");
        assert!(parse_wrk("nothing").is_err());
    }

    #[test]
    fn isolated_wrk_errors_are_reported_and_many_stop_the_benchmark() {
        let out = |errors: &str| {
            format!("    Latency   1.20ms  0.3ms\n  51215 requests in 3.01s, 4.35MB read\n{errors}Requests/sec:  17000.00\n")
        };
        let (_, detail) =
            parse_wrk(&out("  Socket errors: connect 0, read 1, write 0, timeout 0\n")).unwrap();
        assert_eq!(detail, "mean latency 1.20ms, 1 errors in 51215 requests");
        let many =
            out("  Socket errors: connect 0, read 40, write 0, timeout 2\n  Non-2xx or 3xx responses: 20\n");
        assert!(parse_wrk(&many).unwrap_err().to_string().contains("62 errors in 51215 requests"));
    }
}
