//! Dissemination of one store update through a gossip cluster of 1,000 and 5,000 nodes:
//! the real [`Gossip`](meshd_control::gossip::Gossip) state machines and encoding,
//! driven over the in-process simulated network of [`meshd_control::gossip::sim`]
//! (virtual clock, 1–5 ms latency, optional loss). No packet leaves the process.
//!
//! For each cluster: 2 s of virtual warm-up, then node 0 writes one endpoint; the
//! benchmark reports when 50 %, 99 % and 99.99 % of the nodes hold it (virtual ms) and
//! what every node put on the wire per second from the write until 99.99 % plus a 3 s
//! tail of steady-state probing. The 1,000-node rows run several seeds (the tail
//! depends on which nodes the last rounds miss) and report medians; every seed's
//! t99.99 is in the notes. It reports against the goal and never asserts on
//! timing.
//!
//! Every node keeps every member, so building a cluster costs O(n²) time and memory.
//! A run whose projected wall time does not fit the 3-minute budget of a default run is
//! stopped during its warm-up and reported as not measured, with what it cost so far;
//! `GOSSIP_SIM_FULL=1` lifts the budget.
//!
//! Prints a markdown table and writes it to `benches/GOSSIP_SIM.md`.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, Result};
use meshd_control::{
    gossip::{
        sim::{task_endpoint, NetConfig, Sim},
        Config, Millis,
    },
    model::Key,
};

/// Virtual time every cluster runs before the write.
const WARM_UP_MS: Millis = 2_000;
/// Virtual time after 99.99 % is reached that still counts towards bandwidth.
const TAIL_MS: Millis = 3_000;
/// Give up waiting for 99.99 % after this much virtual time (below the first
/// push-pull, which every node runs at 30 s).
const LIMIT_MS: Millis = 20_000;
/// The goal at 1,000 nodes without loss.
const GOAL_MS: Millis = 2_000;
/// The bandwidth budget per node.
const GOAL_KBPS: f64 = 330.0;
/// The dissemination fractions measured, in parts per million.
const FRACTIONS_PPM: [u64; 3] = [500_000, 990_000, 999_900];
/// Wall-clock budget of a default run, in seconds.
const BUDGET_S: f64 = 170.0;
/// Warm-up steps timed to project a run's wall time (after the first step, which
/// also builds every node's first probe round).
const PROJECTION_STEPS: u32 = 10;
/// Virtual time of dissemination assumed when projecting (the goal).
const ASSUMED_SPREAD_MS: Millis = GOAL_MS;
/// The environment variable that lifts the wall-clock budget.
const FULL_VAR: &str = "GOSSIP_SIM_FULL";

/// One cluster configuration to simulate, once per seed.
struct Scenario {
    nodes: usize,
    loss: f64,
    /// Seeds `first_seed..first_seed + runs`.
    first_seed: u64,
    runs: u64,
}

/// What one run (one seed) measured.
struct Measured {
    seed: u64,
    /// Virtual ms from the write until each of [`FRACTIONS_PPM`] held it; `None` if
    /// not within [`LIMIT_MS`].
    reached: [Option<Millis>; 3],
    /// Nodes holding the update at the end.
    holders: usize,
    /// Bytes on the wire, all nodes, over the window.
    bytes: u64,
    /// The bandwidth window in virtual ms.
    window_ms: Millis,
    /// Wall seconds to build the cluster (every node learning every member).
    build_wall: f64,
    /// Wall seconds for the warm-up.
    warm_up_wall: f64,
    /// Wall seconds from the write to the end of the window.
    run_wall: f64,
}

/// Why a run was not measured: its projected cost.
struct Skipped {
    /// Virtual ms of warm-up run before stopping.
    ran_ms: Millis,
    /// Wall seconds to build the cluster.
    build_wall: f64,
    /// Wall seconds per virtual second, from the timed warm-up steps.
    wall_per_virtual_s: f64,
    /// Projected wall seconds for the whole run.
    projected_s: f64,
    /// Wall seconds left in the budget when the run started.
    budget_left_s: f64,
}

/// One row of the report: a scenario's runs.
struct Row {
    nodes: usize,
    loss: f64,
    runs: Vec<Measured>,
    /// Set when the budget stopped the scenario before all its seeds ran.
    skipped: Option<Skipped>,
    /// Seeds the scenario asked for.
    planned: u64,
    /// The process's peak resident set after this scenario, in MiB, if known.
    peak_rss_mib: Option<u64>,
}

impl Measured {
    /// Average kbit/s each of `nodes` sent over the window.
    fn kbps_per_node(&self, nodes: usize) -> f64 {
        self.bytes as f64 * 8.0 / 1000.0 / nodes as f64 / (self.window_ms as f64 / 1000.0)
    }

    /// Whether this run met the goal.
    fn meets_goal(&self, nodes: usize) -> bool {
        self.reached[2].is_some_and(|t| t <= GOAL_MS) && self.kbps_per_node(nodes) <= GOAL_KBPS
    }
}

/// Nodes that make up `ppm` parts per million of `n`, rounded up.
fn needed(n: usize, ppm: u64) -> usize {
    (n as u64 * ppm).div_ceil(1_000_000) as usize
}

/// The process's peak resident set (`VmHWM`) in MiB, on Linux.
fn peak_rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Simulates one run: warm-up, the write, dissemination, the tail. With a budget
/// (wall seconds left), stops during the warm-up if the projection does not fit it.
fn measure(nodes: usize, loss: f64, seed: u64, budget_left_s: Option<f64>) -> Result<Measured, Skipped> {
    let build = Instant::now();
    let net = NetConfig { loss, ..NetConfig::default() };
    let step_ms = net.step;
    let mut sim = Sim::new(nodes, Config::default(), net, seed);
    let build_wall = build.elapsed().as_secs_f64();

    let warm_up = Instant::now();
    sim.step();
    let timed = Instant::now();
    for _ in 0..PROJECTION_STEPS {
        sim.step();
    }
    let wall_per_virtual_s =
        timed.elapsed().as_secs_f64() / (f64::from(PROJECTION_STEPS) * step_ms as f64 / 1000.0);
    let virtual_left_ms = WARM_UP_MS.saturating_sub(sim.now) + ASSUMED_SPREAD_MS + TAIL_MS;
    let projected_s =
        build_wall + warm_up.elapsed().as_secs_f64() + virtual_left_ms as f64 / 1000.0 * wall_per_virtual_s;
    if let Some(budget_left_s) = budget_left_s.filter(|left| projected_s > *left) {
        return Err(Skipped { ran_ms: sim.now, build_wall, wall_per_virtual_s, projected_s, budget_left_s });
    }
    sim.run_until(WARM_UP_MS.saturating_sub(sim.now), |_| false);
    let warm_up_wall = warm_up.elapsed().as_secs_f64();

    let run = Instant::now();
    let written_at = sim.now;
    let bytes_before: u64 = sim.wire_bytes.iter().sum();
    let key = Key::endpoint("web.1");
    assert!(sim.nodes[0].put(task_endpoint("web.1"), written_at), "node 0 accepts the write");

    let needed = FRACTIONS_PPM.map(|ppm| needed(nodes, ppm));
    let mut reached = [None; 3];
    let mut has = vec![false; nodes];
    let mut holders = 0;
    loop {
        for (i, node) in sim.nodes.iter().enumerate() {
            if !has[i] && node.store().get(&key).is_some() {
                has[i] = true;
                holders += 1;
            }
        }
        let elapsed = sim.now - written_at;
        for (at, need) in reached.iter_mut().zip(needed) {
            if at.is_none() && holders >= need {
                *at = Some(elapsed);
            }
        }
        if reached[2].is_some() || elapsed >= LIMIT_MS {
            break;
        }
        sim.step();
    }
    sim.run_until(TAIL_MS, |_| false);
    let bytes: u64 = sim.wire_bytes.iter().sum::<u64>() - bytes_before;

    Ok(Measured {
        seed,
        reached,
        holders,
        bytes,
        window_ms: sim.now - written_at,
        build_wall,
        warm_up_wall,
        run_wall: run.elapsed().as_secs_f64(),
    })
}

/// Runs every seed of a scenario, stopping at the first run the budget rules out.
fn run_scenario(s: &Scenario, started: &Instant, full: bool) -> Row {
    let mut runs = Vec::new();
    let mut skipped = None;
    for seed in s.first_seed..s.first_seed + s.runs {
        let budget_left_s = (!full).then(|| BUDGET_S - started.elapsed().as_secs_f64());
        match measure(s.nodes, s.loss, seed, budget_left_s) {
            Ok(m) => {
                eprintln!(
                    "gossip_sim: seed {seed}: t99.99 = {} ms virtual; {:.1} s wall",
                    time_cell(m.reached[2]),
                    m.build_wall + m.warm_up_wall + m.run_wall
                );
                runs.push(m);
            }
            Err(skip) => {
                eprintln!(
                    "gossip_sim: seed {seed}: not measured, projected {} > {} left (set {FULL_VAR}=1 to \
                     run it)",
                    duration(skip.projected_s),
                    duration(skip.budget_left_s)
                );
                skipped = Some(skip);
                break;
            }
        }
    }
    Row { nodes: s.nodes, loss: s.loss, runs, skipped, planned: s.runs, peak_rss_mib: peak_rss_mib() }
}

/// The median (upper middle) of `values`; `None` (not reached) sorts last.
fn median_time(mut values: Vec<Option<Millis>>) -> Option<Millis> {
    values.sort_by_key(|v| v.unwrap_or(Millis::MAX));
    values[values.len() / 2]
}

/// The median (upper middle) of `values`.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A virtual time cell: the time, or that it was not reached.
fn time_cell(at: Option<Millis>) -> String {
    match at {
        Some(ms) => ms.to_string(),
        None => format!("> {LIMIT_MS} (not reached)"),
    }
}

/// The goal column: the goal and in how many runs it was met, for the row it
/// is set for.
fn goal_cell(row: &Row) -> String {
    if row.nodes != 1_000 || row.loss > 0.0 {
        return "none set (the goal is for 1,000 nodes, no loss)".into();
    }
    let goal =
        format!("99.99 % ≤ {GOAL_MS} ms at ≤ {GOAL_KBPS:.0} kbit/s per node (memberlist's model: ≈ 2200 ms)");
    if row.runs.is_empty() {
        return format!("{goal}: not measured");
    }
    let met = row.runs.iter().filter(|m| m.meets_goal(row.nodes)).count();
    let verdict = if met == row.runs.len() { "**met**" } else { "**missed**" };
    format!("{goal}: {verdict} in {met} of {} seeds", row.runs.len())
}

/// Whole seconds as "N s" or "N min M s".
fn duration(s: f64) -> String {
    let s = s.round() as u64;
    if s < 60 {
        format!("{s} s")
    } else {
        format!("{} min {} s", s / 60, s % 60)
    }
}

/// "lo–hi", or just "lo" when they are the same.
fn span(lo: String, hi: String) -> String {
    if lo == hi {
        lo
    } else {
        format!("{lo}–{hi}")
    }
}

/// The notes line of one row.
fn note(row: &Row) -> String {
    let rss = row.peak_rss_mib.map_or("unknown".into(), |mib| format!("{mib} MiB"));
    let needed = FRACTIONS_PPM.map(|ppm| needed(row.nodes, ppm));
    let mut out = format!(
        "- {} nodes, {:.0} % loss: 50/99/99.99 % = {}/{}/{} nodes. ",
        row.nodes,
        row.loss * 100.0,
        needed[0],
        needed[1],
        needed[2]
    );
    if !row.runs.is_empty() {
        let n = row.runs.len() as f64;
        let per_seed: Vec<String> = row
            .runs
            .iter()
            .map(|m| format!("{} → {}", m.seed, time_cell(m.reached[2]).replace(" (not reached)", "")))
            .collect();
        let kbps: Vec<f64> = row.runs.iter().map(|m| m.kbps_per_node(row.nodes)).collect();
        let (lo, hi) = kbps.iter().fold((f64::MAX, f64::MIN), |(lo, hi), k| (lo.min(*k), hi.max(*k)));
        let kbps = span(format!("{lo:.1}"), format!("{hi:.1}"));
        let windows = span(
            row.runs.iter().map(|m| m.window_ms).min().unwrap_or(0).to_string(),
            row.runs.iter().map(|m| m.window_ms).max().unwrap_or(0).to_string(),
        );
        let everywhere = row.runs.iter().filter(|m| m.holders == row.nodes).count();
        out += &format!(
            "t99.99 ms per seed: {}; kbit/s per node {kbps}; every node held the update at the end in \
             {everywhere} of {} runs; window {windows} ms virtual. Mean wall time per seed: {:.1} s to \
             build, {:.1} s to warm up, {:.1} s for the window. Peak RSS so far {rss}.",
            per_seed.join(", "),
            row.runs.len(),
            row.runs.iter().map(|m| m.build_wall).sum::<f64>() / n,
            row.runs.iter().map(|m| m.warm_up_wall).sum::<f64>() / n,
            row.runs.iter().map(|m| m.run_wall).sum::<f64>() / n,
        );
    }
    if let Some(s) = &row.skipped {
        let sep = if row.runs.is_empty() { "" } else { " " };
        out += &format!(
            "{sep}**{} of {} seeds not measured**: the next run stopped after {} ms of warm-up. Building \
             the cluster took {:.1} s wall, peak RSS {rss}; each virtual second costs {:.1} s wall, so \
             the run (assuming {} ms of dissemination) would take ≈ {}, more than the {} left of this \
             benchmark's {} budget. `{FULL_VAR}=1 cargo bench -p meshd-benches --bench gossip_sim` \
             runs it.",
            row.planned - row.runs.len() as u64,
            row.planned,
            s.ran_ms,
            s.build_wall,
            s.wall_per_virtual_s,
            ASSUMED_SPREAD_MS,
            duration(s.projected_s),
            duration(s.budget_left_s),
            duration(BUDGET_S),
        );
    }
    out + "\n"
}

/// The report: heading, date, command, table and notes.
fn report(rows: &[Row], date: &str, command: &str, total_wall: f64) -> String {
    let mut out = String::from("## Gossip dissemination (simulated)\n\n");
    out += &format!(
        "Measured on {date} ({} cores) with `{command}`.\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    out += "Real `Gossip` state machines and encoding over the in-process simulated network \
            (`meshd_control::gossip::sim`): default `Config` (probe every 1 s, gossip every \
            200 ms to 3 peers), `NetConfig::default()` (1–5 ms latency, 10 ms clock step). \
            Node 0 writes one endpoint after 2 s of virtual warm-up; times are virtual ms from \
            the write, at 10 ms resolution. Bandwidth counts every byte the nodes put on the \
            wire (sealed, plus 28 bytes of IP/UDP headers per datagram) from the write until \
            99.99 % held the update plus 3 s more, divided by nodes and by that window. Each \
            cell is the median over the row's seeds (listed in the notes).\n\n";
    out += "| nodes | loss | t50 ms | t99 ms | t99.99 ms | kbit/s per node (window: write → t99.99 + 3 s) | goal |\n";
    out += "|---:|---:|---:|---:|---:|---:|---|\n";
    for row in rows {
        let cells: Vec<String> = if row.runs.is_empty() {
            vec!["not measured (see notes)".to_owned(); 4]
        } else {
            let mut cells: Vec<String> = (0..3)
                .map(|i| time_cell(median_time(row.runs.iter().map(|m| m.reached[i]).collect())))
                .collect();
            let kbps = median(row.runs.iter().map(|m| m.kbps_per_node(row.nodes)).collect());
            cells.push(format!("{kbps:.1}"));
            cells
        };
        out += &format!(
            "| {} | {:.0} % | {} | {} |\n",
            row.nodes,
            row.loss * 100.0,
            cells.join(" | "),
            goal_cell(row)
        );
    }
    out += "\nNotes:\n\n";
    for row in rows {
        out += &note(row);
    }
    out += "- No node holds its own address on the endpoint's network, so per-network scoping does \
            not narrow it: the update goes to every node (the cluster-wide case).\n";
    out += "- The first TCP push-pull of every node is at 30 s of virtual time, after every window \
            here; its bytes are not included.\n";
    out += &format!("- Whole benchmark: {} wall time.\n", duration(total_wall));
    out
}

fn main() -> Result<()> {
    let started = Instant::now();
    let full = std::env::var_os(FULL_VAR).is_some_and(|v| !v.is_empty() && v != "0");
    let scenarios = [
        Scenario { nodes: 1_000, loss: 0.0, first_seed: 1, runs: 9 },
        Scenario { nodes: 1_000, loss: 0.05, first_seed: 101, runs: 9 },
        // One seed: building 5,000 nodes that each know every member dominates the run.
        Scenario { nodes: 5_000, loss: 0.0, first_seed: 1001, runs: 1 },
    ];
    let mut rows = Vec::new();
    for s in &scenarios {
        eprintln!("gossip_sim: {} nodes, {:.0} % loss, {} seed(s) ...", s.nodes, s.loss * 100.0, s.runs);
        rows.push(run_scenario(s, &started, full));
    }
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "an unknown date".to_owned(), |d| d.trim().to_owned());
    let command = if full {
        format!("{FULL_VAR}=1 cargo bench -p meshd-benches --bench gossip_sim")
    } else {
        "cargo bench -p meshd-benches --bench gossip_sim".to_owned()
    };
    let table = report(&rows, &date, &command, started.elapsed().as_secs_f64());
    print!("{table}");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/GOSSIP_SIM.md");
    std::fs::write(path, &table).with_context(|| format!("writing {path}"))?;
    Ok(())
}
