//! Micro-benchmarks of the hot policy functions: round-robin selection, the reconcile
//! diff at cluster scale, and store merges.
#![expect(missing_docs, reason = "criterion_group! and criterion_main! generate undocumented items")]

use std::net::Ipv4Addr;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use meshd_control::{
    ipam::mac_for_ip,
    model::{Endpoint, EndpointMode, Network, Object, PublishedPort, Service},
    reconcile::{desired, plan, Dataplane},
    store::Store,
};
use meshd_dataplane::{
    lb::{Balancer, Loads, Policy},
    proxy::Proto,
};

fn cluster(tasks: u32) -> Store {
    let mut s = Store::default();
    s.put(
        "n1",
        Object::Network(Network {
            name: "backend".into(),
            subnet: "10.0.0.0/16".parse().unwrap(),
            vni: 4096,
            mtu: None,
        }),
    );
    s.put(
        "n1",
        Object::Service(Service {
            name: "web".into(),
            network: "backend".into(),
            endpoint_mode: EndpointMode::Vip,
            vip: Some(std::net::Ipv4Addr::new(10, 0, 0, 250)),
            health_check: None,
        }),
    );
    s.put(
        "n1",
        Object::Published(PublishedPort {
            published: 3000,
            target: 80,
            proto: Proto::Tcp,
            service: "web".into(),
            mode: Default::default(),
            lb: Default::default(),
            proxy_protocol: false,
            max_connections: 0,
            closing_at: None,
        }),
    );
    for node in 0..50u32 {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + node * 256);
        s.put(
            &format!("n{node}"),
            Object::Endpoint(Endpoint {
                id: Endpoint::node_id(&format!("n{node}"), "backend"),
                service: None,
                network: "backend".into(),
                node: format!("n{node}"),
                ip,
                mac: mac_for_ip(ip),
                vtep: Ipv4Addr::new(198, 18, 0, node as u8),
                host_if: None,
                netns: None,
                health: Default::default(),
                draining: false,
            }),
        );
    }
    for t in 0..tasks {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 2)) + t);
        let node = format!("n{}", t % 50);
        s.put(
            &node,
            Object::Endpoint(Endpoint {
                id: format!("web.{t}"),
                service: Some("web".into()),
                network: "backend".into(),
                node: node.clone(),
                ip,
                mac: mac_for_ip(ip),
                vtep: Ipv4Addr::new(198, 18, 0, (t % 50) as u8),
                host_if: Some(format!("mv{t:08x}")),
                netns: Some(format!("/run/netns/t{t}")),
                health: Default::default(),
                draining: false,
            }),
        );
    }
    s
}

fn benches(c: &mut Criterion) {
    let backends: Vec<std::net::SocketAddr> =
        (0..64u32).map(|i| std::net::SocketAddr::from((Ipv4Addr::from(0x0a00_0002 + i), 80))).collect();
    let client = std::net::IpAddr::from([198, 18, 0, 100]);
    for policy in [Policy::RoundRobin, Policy::LeastConn, Policy::P2c, Policy::Maglev] {
        let balancer = Balancer::new(policy, backends.clone(), &Loads::default(), Default::default());
        c.bench_function(&format!("{policy}_pick_64_backends"), |b| {
            b.iter(|| black_box(balancer.order(client).next()))
        });
    }

    let store = cluster(1000);
    let live = (0..50).map(|n| format!("n{n}")).collect();
    c.bench_function("desired_1000_tasks_50_nodes", |b| {
        b.iter(|| black_box(desired(&store, &live, "n1", 1450)))
    });
    let want = desired(&store, &live, "n1", 1450);
    c.bench_function("plan_from_empty_1000_tasks", |b| {
        b.iter(|| black_box(plan(&Dataplane::default(), &want)))
    });
    c.bench_function("plan_converged_1000_tasks", |b| b.iter(|| black_box(plan(&want, &want))));

    let mut other = cluster(1000);
    other.delete("n7", "endpoint/web.7");
    c.bench_function("store_merge_1000_tasks_one_change", |b| {
        b.iter_batched(|| store.clone(), |mut s| black_box(s.merge(&other)), criterion::BatchSize::LargeInput)
    });
}

criterion_group!(policy, benches);
criterion_main!(policy);
