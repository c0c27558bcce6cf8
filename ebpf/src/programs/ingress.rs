//! The kernel routing mesh for published ports (#6): XDP `ingress_xdp` on the underlay
//! interface and tc `ingress_reply` on each local task's host veth. The maps and the
//! decisions are `meshd_common::ingress`; this file only moves bytes.

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use meshd_common::{
    ingress::{
        Flow, FlowKey, IngressBackend, IngressConfig, IngressFrontend, Nat, DEFAULT_INGRESS_TABLES,
        IN_STAT_ENTRIES, MAX_INGRESS_BACKENDS, MAX_INGRESS_FLOWS, MAX_INGRESS_FRONTENDS, MAX_INGRESS_NAT,
    },
    maglev::MAGLEV_TABLE_SIZE,
    FrontendKey,
};

/// Published ports of this node (`meshd_common::ingress::INGRESS_FRONTENDS_MAP`).
#[map(name = "IN_FRONTENDS")]
static IN_FRONTENDS: HashMap<FrontendKey, IngressFrontend> =
    HashMap::with_max_entries(MAX_INGRESS_FRONTENDS, 0);

/// Backends by id (`INGRESS_BACKENDS_MAP`).
#[map(name = "IN_BACKENDS")]
static IN_BACKENDS: Array<IngressBackend> = Array::with_max_entries(MAX_INGRESS_BACKENDS, 0);

/// Maglev tables (`INGRESS_MAGLEV_MAP`).
#[map(name = "IN_MAGLEV")]
static IN_MAGLEV: Array<u32> = Array::with_max_entries(DEFAULT_INGRESS_TABLES * MAGLEV_TABLE_SIZE, 0);

/// Client flows (`INGRESS_FLOWS_MAP`).
#[map(name = "IN_FLOWS")]
static IN_FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(MAX_INGRESS_FLOWS, 0);

/// Reverse translations (`INGRESS_NAT_MAP`).
#[map(name = "IN_NAT")]
static IN_NAT: LruHashMap<FlowKey, Nat> = LruHashMap::with_max_entries(MAX_INGRESS_NAT, 0);

/// The loader's settings (`INGRESS_CONFIG_MAP`, index 0).
#[map(name = "IN_CONFIG")]
static IN_CONFIG: Array<IngressConfig> = Array::with_max_entries(1, 0);

/// Per-CPU outcome counters (`INGRESS_STATS_MAP`).
#[map(name = "IN_STATS")]
static IN_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(IN_STAT_ENTRIES, 0);

/// XDP on the underlay interface: published-port traffic in, snat replies back.
#[xdp]
pub fn ingress_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// tc ingress on a local task's host veth: the task's replies to ingress clients.
#[classifier]
pub fn ingress_reply(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}
