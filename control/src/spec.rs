//! Parsers for what users type: port specs like `3000:80/tcp`, durations like `10s`.

use std::{str::FromStr, time::Duration};

use meshd_dataplane::proxy::Proto;
use serde::{Deserialize, Serialize};

/// `PUBLISHED:TARGET[/tcp|/udp]`, as in `meshctl publish 3000:80 mvcapp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Port answered on every node.
    pub published: u16,
    /// Port of the tasks.
    pub target: u16,
    /// Transport protocol (default tcp).
    pub proto: Proto,
}

/// `PUBLISHED[/tcp|/udp]`, as in `meshctl unpublish 3000`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishedSpec {
    /// The published port.
    pub published: u16,
    /// Transport protocol (default tcp).
    pub proto: Proto,
}

fn parse_port(s: &str, what: &str, spec: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => {
            Err(format!("invalid port spec {spec:?}: {what} port {s:?} is not a number from 1 to 65535"))
        }
        Ok(p) => Ok(p),
    }
}

fn split_proto(spec: &str) -> Result<(&str, Proto), String> {
    match spec.split_once('/') {
        None => Ok((spec, Proto::Tcp)),
        Some((ports, "tcp")) => Ok((ports, Proto::Tcp)),
        Some((ports, "udp")) => Ok((ports, Proto::Udp)),
        Some((_, other)) => Err(format!("invalid port spec {spec:?}: protocol {other:?} is not tcp or udp")),
    }
}

impl FromStr for PortSpec {
    type Err = String;
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (ports, proto) = split_proto(spec)?;
        let Some((published, target)) = ports.split_once(':') else {
            return Err(format!(
                "invalid port spec {spec:?}: expected PUBLISHED:TARGET[/tcp|/udp], e.g. 3000:80"
            ));
        };
        Ok(PortSpec {
            published: parse_port(published, "published", spec)?,
            target: parse_port(target, "target", spec)?,
            proto,
        })
    }
}

impl FromStr for PublishedSpec {
    type Err = String;
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (port, proto) = split_proto(spec)?;
        Ok(PublishedSpec { published: parse_port(port, "published", spec)?, proto })
    }
}

/// The longest duration a flag takes (an hour: longer is surely a typo).
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

/// A duration as users type it: a whole number with a unit, `ms`, `s`, `m` or `h`
/// (`500ms`, `10s`, `2m`), or `0`; at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}: use a number with ms, s, m or h, e.g. 10s or 500ms");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(bad()),
    };
    let d = ms.map(Duration::from_millis).filter(|d| *d <= MAX_DURATION);
    d.ok_or_else(|| format!("duration {s:?} is longer than {}s", MAX_DURATION.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_users_type() {
        assert_eq!(
            "3000:80".parse::<PortSpec>(),
            Ok(PortSpec { published: 3000, target: 80, proto: Proto::Tcp })
        );
        assert_eq!("53:5353/udp".parse::<PortSpec>().unwrap().proto, Proto::Udp);
        assert_eq!("3000/tcp".parse::<PublishedSpec>().unwrap().published, 3000);
    }

    #[test]
    fn rejects_malformed_specs_with_the_expected_form() {
        for bad in ["3000", "abc:80", "3000:", ":80", "0:80", "70000:80", "3000:80/sctp", ""] {
            let err = bad.parse::<PortSpec>().unwrap_err();
            assert!(err.contains("invalid port spec"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_parse_with_units_and_bad_ones_say_how() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "10", "s", "1.5s", "-1s", "10sec", "ten"] {
            assert!(parse_duration(bad).unwrap_err().contains("use a number with ms, s, m or h"), "{bad}");
        }
        assert!(parse_duration("2h").unwrap_err().contains("longer than 3600s"));
    }
}
