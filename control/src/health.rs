//! Active health checks (`meshctl service create|update --health-*`): each node probes
//! its own tasks and writes a task's health into the cluster state when it flips, so
//! every node's every path follows it (`reconcile::in_rotation`). The judging is pure
//! ([`Tracker`], [`parse_probe`], [`http_ok`]); [`probe`] is the thin I/O.

use std::{net::Ipv4Addr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

use crate::model::{Health, HealthCheck, Probe};

/// Defaults of `--health-*`: a dead task leaves rotation within two intervals (one
/// failed probe plus its timeout, then gossip); it returns after two passes in a row.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// See [`DEFAULT_INTERVAL`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
/// See [`DEFAULT_INTERVAL`].
pub const DEFAULT_RETRIES: u32 = 1;
/// See [`DEFAULT_INTERVAL`].
pub const DEFAULT_PASSES: u32 = 2;

/// The probe `--health-tcp PORT` or `--health-http PORT:/PATH` describes (at most
/// one of them); `None` for neither.
pub fn parse_probe(tcp: Option<u16>, http: Option<&str>) -> Result<Option<Probe>, String> {
    match (tcp, http) {
        (Some(_), Some(_)) => Err("give either --health-tcp or --health-http, not both".into()),
        (Some(0), None) => Err("--health-tcp 0 is not a port; give the task's port, e.g. 80".into()),
        (Some(port), None) => Ok(Some(Probe::Tcp { port })),
        (None, Some(spec)) => {
            let bad = || format!("invalid --health-http {spec:?}: expected PORT:/PATH, e.g. 80:/healthz");
            let (port, path) = spec.split_once(':').ok_or_else(bad)?;
            let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad());
            }
            Ok(Some(Probe::Http { port, path: path.to_owned() }))
        }
        (None, None) => Ok(None),
    }
}

/// A health check from its parts, checked: positive interval and timeout (the timeout
/// below the interval, so probes of one task never overlap), retries and passes ≥ 1.
pub fn check(
    probe: Probe,
    interval: Duration,
    timeout: Duration,
    retries: u32,
    passes: u32,
) -> Result<HealthCheck, String> {
    if interval.is_zero() || timeout.is_zero() {
        return Err("--health-interval and --health-timeout must be positive, e.g. 1s and 500ms".into());
    }
    if timeout >= interval {
        return Err(format!(
            "--health-timeout {timeout:?} must be shorter than --health-interval {interval:?}"
        ));
    }
    if retries == 0 || passes == 0 {
        return Err("--health-retries and --health-passes must be at least 1".into());
    }
    let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    Ok(HealthCheck { probe, interval_ms: ms(interval), timeout_ms: ms(timeout), retries, passes })
}

/// One task's run of probe results.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tracker {
    /// What the task is judged now.
    pub health: Health,
    fails: u32,
    passes: u32,
}

impl Tracker {
    /// A tracker starting from `health` (what the store says, e.g. after a restart).
    pub fn new(health: Health) -> Tracker {
        Tracker { health, fails: 0, passes: 0 }
    }

    /// Records one probe; returns the new health when it flips.
    pub fn record(&mut self, passed: bool, check: &HealthCheck) -> Option<Health> {
        if passed {
            self.passes += 1;
            self.fails = 0;
        } else {
            self.fails += 1;
            self.passes = 0;
        }
        let next = match self.health {
            Health::Healthy if self.fails >= check.retries => Health::Unhealthy,
            Health::Unhealthy if self.passes >= check.passes => Health::Healthy,
            same => same,
        };
        (next != self.health).then(|| {
            self.health = next;
            next
        })
    }
}

/// Whether an HTTP response head starts with a 2xx or 3xx status line.
pub fn http_ok(head: &[u8]) -> bool {
    let line = head.split(|&b| b == b'\r' || b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    version.starts_with(b"HTTP/1.") && code.len() == 3 && matches!(code[0], b'2' | b'3')
}

/// Runs `probe` against the task at `addr`, within `limit`: a TCP connect, or an HTTP
/// GET whose status line must be 2xx/3xx (the first 512 bytes are read, no more).
pub async fn probe(addr: Ipv4Addr, probe: &Probe, limit: Duration) -> bool {
    let attempt = async {
        match probe {
            Probe::Tcp { port } => TcpStream::connect((addr, *port)).await.is_ok(),
            Probe::Http { port, path } => {
                let Ok(mut stream) = TcpStream::connect((addr, *port)).await else { return false };
                let request =
                    format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: meshd-health\r\n\r\n");
                if stream.write_all(request.as_bytes()).await.is_err() {
                    return false;
                }
                let mut head = [0u8; 512];
                let mut len = 0;
                while len < head.len() && !head[..len].contains(&b'\n') {
                    match stream.read(&mut head[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                }
                http_ok(&head[..len])
            }
        }
    };
    timeout(limit, attempt).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc(retries: u32, passes: u32) -> HealthCheck {
        check(Probe::Tcp { port: 80 }, Duration::from_secs(1), Duration::from_millis(500), retries, passes)
            .unwrap()
    }

    #[test]
    fn a_task_flips_after_retries_failures_and_back_after_passes() {
        let c = hc(2, 2);
        let mut t = Tracker::default();
        assert_eq!(t.record(false, &c), None);
        assert_eq!(t.record(true, &c), None, "a pass resets the failures");
        assert_eq!(t.record(false, &c), None);
        assert_eq!(t.record(false, &c), Some(Health::Unhealthy));
        assert_eq!(t.record(false, &c), None);
        assert_eq!(t.record(true, &c), None);
        assert_eq!(t.record(true, &c), Some(Health::Healthy));
        assert_eq!(t.health, Health::Healthy);
    }

    #[test]
    fn probes_parse_and_bad_ones_say_how() {
        assert_eq!(parse_probe(Some(80), None), Ok(Some(Probe::Tcp { port: 80 })));
        assert_eq!(
            parse_probe(None, Some("8080:/healthz")),
            Ok(Some(Probe::Http { port: 8080, path: "/healthz".into() }))
        );
        assert_eq!(parse_probe(None, None), Ok(None));
        assert!(parse_probe(Some(80), Some("80:/")).unwrap_err().contains("not both"));
        for bad in ["80", "80:healthz", ":/x", "0:/x", "x:/y", "80:/a b"] {
            assert!(parse_probe(None, Some(bad)).unwrap_err().contains("expected PORT:/PATH"), "{bad}");
        }
    }

    #[test]
    fn checks_refuse_zero_and_overlapping_timings() {
        let p = || Probe::Tcp { port: 80 };
        let s = Duration::from_secs;
        assert!(check(p(), s(0), s(1), 1, 1).unwrap_err().contains("must be positive"));
        assert!(check(p(), s(1), s(1), 1, 1).unwrap_err().contains("shorter than"));
        assert!(check(p(), s(2), s(1), 0, 1).unwrap_err().contains("at least 1"));
        assert_eq!(check(p(), s(2), s(1), 3, 2).unwrap().interval_ms, 2000);
    }

    #[test]
    fn only_2xx_and_3xx_status_lines_pass() {
        assert!(http_ok(b"HTTP/1.1 200 OK\r\n"));
        assert!(http_ok(b"HTTP/1.0 302 Found\r\n"));
        assert!(!http_ok(b"HTTP/1.1 500 Internal Server Error\r\n"));
        assert!(!http_ok(b"HTTP/1.1 404 Not Found"));
        assert!(!http_ok(b"SSH-2.0-OpenSSH\r\n"));
        assert!(!http_ok(b""));
    }
}
