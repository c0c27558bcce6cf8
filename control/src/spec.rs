//! Parsers for what users type: port specs like `3000:80/tcp`.

use std::str::FromStr;

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
}
