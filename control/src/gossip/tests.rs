use super::{sim::*, *};
use crate::model::Key;

fn endpoint(id: &str) -> Object {
    task_endpoint(id)
}

fn state_of(sim: &Sim, observer: usize, node: usize) -> Option<MemberState> {
    sim.nodes[observer].members().find(|m| m.name == format!("node-{node}")).map(|m| m.state)
}

#[test]
fn an_update_reaches_every_node_of_fifty_within_two_seconds() {
    let mut sim = Sim::new(50, Config::default(), NetConfig::default(), 7);
    sim.run_until(1000, |_| false);
    let now = sim.now;
    sim.nodes[0].put(endpoint("web.1"), now);
    let key = Key::endpoint("web.1");
    let reached = sim.run_until(2000, |s| s.nodes.iter().all(|n| n.store().get(&key).is_some()));
    assert!(reached, "not everywhere after 2 s");
}

#[test]
fn a_deletion_spreads_as_a_tombstone() {
    let mut sim = Sim::new(10, Config::default(), NetConfig::default(), 8);
    let key = Key::endpoint("web.1");
    sim.nodes[3].put(endpoint("web.1"), 0);
    assert!(sim.run_until(3000, |s| s.nodes.iter().all(|n| n.store().get(&key).is_some())));
    let now = sim.now;
    sim.nodes[5].delete(&key, now);
    assert!(sim.run_until(3000, |s| s.nodes.iter().all(|n| n.store().get(&key).is_none())));
    assert!(sim.nodes.iter().all(|n| n.store().entry(&key).is_some()), "tombstones kept until reaped");
}

#[test]
fn a_crashed_node_is_declared_dead_everywhere_within_ten_seconds() {
    let mut sim = Sim::new(5, Config::default(), NetConfig::default(), 9);
    sim.run_until(2000, |_| false);
    sim.crash(4);
    let dead = sim.run_until(10_000, |s| (0..4).all(|o| state_of(s, o, 4) == Some(MemberState::Dead)));
    assert!(dead, "states: {:?}", (0..4).map(|o| state_of(&sim, o, 4)).collect::<Vec<_>>());
    assert!(!sim.nodes[0].live_nodes().contains("node-4"));
    // Nobody else was wrongly declared dead.
    for o in 0..4 {
        for n in (0..4).filter(|n| *n != o) {
            assert_eq!(state_of(&sim, o, n), Some(MemberState::Alive), "node-{o} about node-{n}");
        }
    }
}

#[test]
fn a_restarted_node_refutes_its_death_and_is_alive_again() {
    let mut sim = Sim::new(5, Config::default(), NetConfig::default(), 10);
    sim.crash(2);
    assert!(sim.run_until(15_000, |s| state_of(s, 0, 2) == Some(MemberState::Dead)));
    sim.restart(2, 0, Config::default());
    let back = sim.run_until(5_000, |s| {
        (0..5).filter(|o| *o != 2).all(|o| state_of(s, o, 2) == Some(MemberState::Alive))
    });
    assert!(back, "{:?}", (0..5).map(|o| state_of(&sim, o, 2)).collect::<Vec<_>>());
    assert!(sim.nodes[2].incarnation() > 0, "it refuted with a higher incarnation");
    assert_eq!(sim.nodes[2].members().count(), 4, "it learned the members by push-pull");
}

#[test]
fn no_false_deaths_under_ten_percent_loss() {
    let net = NetConfig { loss: 0.10, ..NetConfig::default() };
    let mut sim = Sim::new(20, Config::default(), net, 11);
    sim.run_until(30_000, |_| false);
    for o in 0..20 {
        assert!(
            sim.nodes[o].members().all(|m| m.state != MemberState::Dead),
            "node-{o} declared someone dead"
        );
    }
}

#[test]
fn suspicion_about_oneself_is_refuted_with_a_higher_incarnation() {
    let mut g = Gossip::new(Config::default(), "a".into(), sim_addr(0), 1, Store::default(), 1, 0);
    let packet = Packet {
        from: "b".into(),
        from_addr: sim_addr(1),
        epoch: 1,
        seq: 1,
        msg: Msg::Gossip,
        updates: vec![Update::Suspect { node: "a".into(), incarnation: 0, from: "b".into() }],
    };
    g.handle_packet(packet, 10);
    assert_eq!(g.incarnation(), 1);
    assert!(g
        .queue
        .values()
        .any(|q| q.update == Update::Alive { node: "a".into(), addr: sim_addr(0), incarnation: 1 }));
}

#[test]
fn lifeguard_suspicion_timeout_shrinks_with_confirmations() {
    let mut g = Gossip::new(Config::default(), "a".into(), sim_addr(0), 1, Store::default(), 1, 0);
    for i in 1..10 {
        g.learn_member(&format!("n{i}"), sim_addr(i), 0);
    }
    let (min, max) = g.suspicion_bounds();
    assert_eq!(g.suspicion_timeout(0), max);
    assert!(g.suspicion_timeout(1) < max && g.suspicion_timeout(1) > min);
    assert_eq!(g.suspicion_timeout(3), min);
}

#[test]
fn packets_stay_within_the_udp_limit_even_with_a_full_queue() {
    let cfg = Config::default();
    let mut g = Gossip::new(cfg.clone(), "a".into(), sim_addr(0), 1, Store::default(), 1, 0);
    g.learn_member("b", sim_addr(1), 0);
    for i in 0..500 {
        g.put(endpoint(&format!("web.{i}")), 0);
    }
    for out in g.tick(1) {
        if let Out::Udp { bytes, .. } = out {
            assert!(bytes.len() <= cfg.udp_limit, "{} bytes", bytes.len());
        }
    }
}

#[test]
fn a_healed_partition_converges_with_writes_from_both_sides() {
    let mut sim = Sim::new(6, Config::default(), NetConfig::default(), 12);
    sim.run_until(2000, |_| false);
    sim.partition(|i| (i >= 3) as u8);
    // Long enough for each side to declare the other dead.
    assert!(sim.run_until(20_000, |s| state_of(s, 0, 5) == Some(MemberState::Dead)));
    let now = sim.now;
    sim.nodes[0].put(endpoint("left.1"), now);
    sim.nodes[4].put(endpoint("right.1"), now);
    sim.run_until(3000, |_| false);
    assert!(sim.nodes[0].store().get(&Key::endpoint("right.1")).is_none(), "partition holds");
    sim.heal();
    let converged = sim.run_until(30_000, |s| {
        s.nodes.iter().all(|n| {
            n.store().get(&Key::endpoint("left.1")).is_some()
                && n.store().get(&Key::endpoint("right.1")).is_some()
                && n.members().all(|m| m.state == MemberState::Alive)
        })
    });
    assert!(converged, "not converged 30 s after healing");
}

#[test]
fn a_burst_of_concurrent_writes_on_every_node_reaches_every_node() {
    for seed in 0..20 {
        let mut sim = Sim::new(5, Config::default(), NetConfig::default(), 100 + seed);
        sim.run_until(1500, |_| false);
        let now = sim.now;
        for i in 0..5 {
            for k in 0..5 {
                sim.nodes[i].put(endpoint(&format!("web.{i}.{k}")), now);
            }
        }
        let keys: Vec<String> =
            (0..5).flat_map(|i| (0..5).map(move |k| Key::endpoint(&format!("web.{i}.{k}")))).collect();
        let ok =
            sim.run_until(3000, |s| s.nodes.iter().all(|n| keys.iter().all(|k| n.store().get(k).is_some())));
        let missing: Vec<(usize, usize)> = sim
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (i, keys.iter().filter(|k| n.store().get(k).is_none()).count()))
            .filter(|(_, m)| *m > 0)
            .collect();
        assert!(ok, "seed {seed}: missing per node {missing:?}");
    }
}
