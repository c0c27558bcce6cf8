//! The metrics endpoint (`meshd --metrics-addr`, default `127.0.0.1:9946`): the proxy's
//! counters per published port and per backend, the kernel ingress path's packets by
//! outcome, each task's health, and the gossip counters `meshctl status` shows, in the
//! Prometheus/OpenMetrics text format.
//!
//! The exposition is built from snapshots at each scrape: the hot path keeps only the
//! relaxed atomics the proxy has anyway. `prometheus-client` encodes it. The HTTP side is
//! written here on purpose, for one route: it answers `GET /metrics` and nothing else,
//! one request per connection, at most [`MAX_SCRAPES`] at once (more are closed at
//! once), a client that has not sent its request within [`REQUEST_WAIT`] is dropped, and
//! a request longer than [`MAX_REQUEST`] is refused — a server library would bring much
//! more than that to guard.

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::timeout,
};

use super::Agent;

/// Scrapes served at once; a connection beyond is closed without an answer.
pub const MAX_SCRAPES: usize = 4;

/// How long a scraper has to send its request.
pub const REQUEST_WAIT: Duration = Duration::from_secs(5);

/// The longest request head read.
pub const MAX_REQUEST: usize = 4096;

type Labels = Vec<(String, String)>;

/// One exposition being built.
struct Exposition(Registry);

impl Exposition {
    fn counter(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, u64)>) {
        let family = Family::<Labels, Counter>::default();
        for (labels, value) in rows {
            family.get_or_create(&labels).inc_by(value);
        }
        self.0.register(name, help, family);
    }

    fn gauge(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, i64)>) {
        let family = Family::<Labels, Gauge>::default();
        for (labels, value) in rows {
            family.get_or_create(&labels).set(value);
        }
        self.0.register(name, help, family);
    }

    /// One counter without labels.
    fn total(&mut self, name: &str, help: &str, value: u64) {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        self.0.register(name, help, counter);
    }

    /// One gauge without labels.
    fn level(&mut self, name: &str, help: &str, value: i64) {
        let gauge = Gauge::<i64>::default();
        gauge.set(value);
        self.0.register(name, help, gauge);
    }
}

fn labels<const N: usize>(pairs: [(&str, String); N]) -> Labels {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

impl Agent {
    /// The text exposition of everything this node counts, now.
    pub(super) fn metrics_text(&self) -> String {
        let mut out = Exposition(Registry::with_prefix("meshd"));
        let ports = self.proxy_stats.ports();
        let port_label = |proto: &meshd_dataplane::proxy::Proto, port: &u16| format!("{port}/{proto}");
        out.gauge(
            "proxy_port_connections",
            "Connections (UDP: flows) the proxy holds for a published port now",
            ports
                .iter()
                .map(|((proto, port), c)| (labels([("port", port_label(proto, port))]), c.active as i64)),
        );
        out.counter(
            "proxy_port_accepted",
            "Connections (UDP: flows) a published port's listener took",
            ports.iter().map(|((proto, port), c)| (labels([("port", port_label(proto, port))]), c.accepted)),
        );
        out.counter(
            "proxy_port_refused_at_limit",
            "Connections reset (UDP: datagrams dropped) at the port's --max-connections",
            ports
                .iter()
                .map(|((proto, port), c)| (labels([("port", port_label(proto, port))]), c.refused_at_limit)),
        );
        let backends: Vec<_> = ports
            .iter()
            .flat_map(|((proto, port), c)| {
                c.backends.iter().map(move |(addr, b)| {
                    (labels([("port", port_label(proto, port)), ("backend", addr.to_string())]), b)
                })
            })
            .collect();
        out.gauge(
            "proxy_backend_connections",
            "Connections (UDP: flows) relayed to a backend now",
            backends.iter().map(|(l, b)| (l.clone(), b.active as i64)),
        );
        out.counter(
            "proxy_backend_accepted",
            "Connections (UDP: flows) a backend took",
            backends.iter().map(|(l, b)| (l.clone(), b.connections)),
        );
        out.counter(
            "proxy_backend_connect_errors",
            "Connects to a backend that failed or timed out (the next backend was tried)",
            backends.iter().map(|(l, b)| (l.clone(), b.connect_errors)),
        );
        out.counter(
            "proxy_backend_bytes",
            "Bytes relayed, by direction (to_backend: from clients; to_client: from the backend)",
            backends.iter().flat_map(|(l, b)| {
                let with = |direction: &str| {
                    let mut l = l.clone();
                    l.push(("direction".into(), direction.into()));
                    l
                };
                [(with("to_backend"), b.bytes_to_backend), (with("to_client"), b.bytes_to_client)]
            }),
        );
        // The proxy's totals over all ports: `*_active` now, the rest since the start.
        if let Ok(serde_json::Value::Object(totals)) = serde_json::to_value(self.proxy_stats.counters()) {
            for (name, value) in totals {
                let Some(value) = value.as_u64() else { continue };
                let help = format!("The proxy's {} (meshctl status: proxy.counters)", name.replace('_', " "));
                match name.ends_with("_active") {
                    true => out.level(&format!("proxy_{name}"), &help, value as i64),
                    false => out.total(&format!("proxy_{name}"), &help, value),
                }
            }
        }
        // The kernel ingress path (XDP/tc) counts packets by outcome, over all ports.
        let ingress = self.ingress.lock().as_ref().map(|i| i.status().counters);
        if let Some(Ok(serde_json::Value::Object(outcomes))) = ingress.map(serde_json::to_value) {
            out.counter(
                "ingress_packets",
                "Packets the kernel ingress programs handled, by outcome (meshctl status: ingress.counters)",
                outcomes
                    .into_iter()
                    .filter_map(|(outcome, v)| Some((labels([("outcome", outcome)]), v.as_u64()?))),
            );
        }
        for (name, value) in self.shared.counters.snapshot() {
            let help = format!("Gossip: {} (meshctl status: gossip.counters)", name.replace('_', " "));
            out.total(&format!("gossip_{name}"), &help, value);
        }
        let tasks: Vec<(Labels, i64)> = {
            let gossip = self.gossip();
            gossip
                .store()
                .endpoints()
                .filter_map(|e| {
                    let service = e.service.clone()?;
                    let healthy = e.health == crate::model::Health::Healthy;
                    Some((
                        labels([("task", e.id.clone()), ("service", service), ("node", e.node.clone())]),
                        healthy as i64,
                    ))
                })
                .collect()
        };
        out.gauge(
            "task_healthy",
            "1 while a task passes its health checks (or has none), 0 while it fails them",
            tasks,
        );
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &out.0);
        text
    }
}

/// Serves scrapes on `listener` until the task is dropped.
pub(super) async fn serve_metrics(listener: TcpListener, agent: Arc<Agent>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::debug!(%error, "accepting a metrics scrape");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many metrics scrapes at once; closing this one");
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(error) = answer(stream, &agent).await {
                tracing::debug!(%peer, %error, "metrics scrape failed");
            }
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
}

/// The route of a request head (`GET /metrics HTTP/1.1`); `None` if it is not HTTP.
fn route(head: &str) -> Option<Route> {
    let mut parts = head.lines().next()?.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    Some(match (method, path) {
        ("GET" | "HEAD", "/metrics") => Route::Metrics,
        ("GET" | "HEAD", _) => Route::NotFound,
        _ => Route::BadMethod,
    })
}

async fn answer(mut stream: TcpStream, agent: &Agent) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut chunk).await?;
            if n == 0 || head.len() + n > MAX_REQUEST {
                return Err(std::io::Error::other("request head too long or cut short"));
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    };
    let read = timeout(REQUEST_WAIT, read_head).await;
    let (status, body) = match read {
        Err(_) => return Err(std::io::Error::other("no request within the wait")),
        Ok(Err(error)) => ("400 Bad Request", format!("{error}\n")),
        Ok(Ok(())) => match route(&String::from_utf8_lossy(&head)) {
            Some(Route::Metrics) => ("200 OK", agent.metrics_text()),
            Some(Route::NotFound) => ("404 Not Found", "only /metrics is served here\n".to_owned()),
            Some(Route::BadMethod) => ("405 Method Not Allowed", "use GET\n".to_owned()),
            None => ("400 Bad Request", "not an HTTP/1 request\n".to_owned()),
        },
    };
    let content_type = match status {
        "200 OK" => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        _ => "text/plain; charset=utf-8",
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    timeout(REQUEST_WAIT, stream.write_all(response.as_bytes()))
        .await
        .map_err(|_| std::io::Error::other("the scraper does not read"))??;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_get_metrics_and_refuses_the_rest() {
        assert_eq!(route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Some(Route::Metrics));
        assert_eq!(route("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Some(Route::Metrics));
        assert_eq!(route("GET / HTTP/1.1\r\n\r\n"), Some(Route::NotFound));
        assert_eq!(route("POST /metrics HTTP/1.1\r\n\r\n"), Some(Route::BadMethod));
        assert_eq!(route("hello\r\n\r\n"), None);
        assert_eq!(route("GET /metrics SPDY\r\n\r\n"), None);
    }

    #[test]
    fn an_exposition_encodes_counters_and_gauges_with_labels() {
        let mut out = Exposition(Registry::with_prefix("meshd"));
        out.counter("things", "Things", [(labels([("port", "3000/tcp".into())]), 7)]);
        out.level("level", "Level", 3);
        let mut text = String::new();
        encode(&mut text, &out.0).unwrap();
        assert!(text.contains("meshd_things_total{port=\"3000/tcp\"} 7"), "{text}");
        assert!(text.contains("meshd_level 3"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
