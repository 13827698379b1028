//! Which address ranges belong to the cluster, so a session routes them through the agent
//! without `--cidr`: pod ranges from the nodes' `podCIDRs` (else the smallest range covering
//! the pod IPs seen), the Service range from the ServiceCIDR API (else from the apiserver's
//! refusal of an out-of-range clusterIP). Every range says where it came from; a range is never
//! invented from nothing.
//!
//! The functions here are pure over fetched objects and messages; `api` fetches them.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::networking::v1::ServiceCIDR;

/// Where a range was learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CidrSource {
    /// A node's `spec.podCIDRs`.
    NodePodCidr { node: String },
    /// The smallest range covering this many observed pod IPs (nodes have no podCIDRs).
    PodIpCover { pods: usize },
    /// A `networking.k8s.io/v1` ServiceCIDR object.
    ServiceCidr { name: String },
    /// The apiserver's answer to a dry-run Service with a clusterIP outside every range.
    DryRunRefusal,
}

impl fmt::Display for CidrSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CidrSource::NodePodCidr { node } => write!(f, "podCIDRs of node {node}"),
            CidrSource::PodIpCover { pods } => write!(f, "cover of {pods} pod IPs"),
            CidrSource::ServiceCidr { name } => write!(f, "ServiceCIDR {name}"),
            CidrSource::DryRunRefusal => f.write_str("apiserver's refusal of a dry-run Service"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredCidr {
    pub net: IpNet,
    pub source: CidrSource,
}

/// The cluster's ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterCidrs {
    pub pods: Vec<DiscoveredCidr>,
    pub services: Vec<DiscoveredCidr>,
}

/// Every node's `podCIDRs` (or the older single `podCIDR`); unparsable entries are skipped,
/// duplicates kept once.
pub fn node_pod_cidrs(nodes: &[Node]) -> Vec<DiscoveredCidr> {
    let mut found: Vec<DiscoveredCidr> = Vec::new();
    for node in nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let Some(spec) = &node.spec else { continue };
        let listed = spec.pod_cidrs.iter().flatten();
        let single = spec.pod_cidr.iter().filter(|_| spec.pod_cidrs.is_none());
        for text in listed.chain(single) {
            let Ok(net) = text.parse::<IpNet>() else {
                continue;
            };
            let net = net.trunc();
            if !found.iter().any(|d| d.net == net) {
                found.push(DiscoveredCidr {
                    net,
                    source: CidrSource::NodePodCidr { node: name.clone() },
                });
            }
        }
    }
    found
}

/// The smallest range of each address family that covers all `ips`.
pub fn cover(ips: &[IpAddr]) -> Vec<IpNet> {
    let v4: Vec<u32> = ips
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(u32::from(*v4)),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<u128> = ips
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V6(v6) => Some(u128::from(*v6)),
            IpAddr::V4(_) => None,
        })
        .collect();
    let mut nets = Vec::new();
    if let (Some(lo), Some(hi)) = (v4.iter().min(), v4.iter().max()) {
        let prefix = (lo ^ hi).leading_zeros() as u8;
        // The prefix is at most 32, so the constructor cannot fail.
        if let Ok(net) = ipnet::Ipv4Net::new((*lo).into(), prefix) {
            nets.push(IpNet::V4(net.trunc()));
        }
    }
    if let (Some(lo), Some(hi)) = (v6.iter().min(), v6.iter().max()) {
        let prefix = (lo ^ hi).leading_zeros() as u8;
        if let Ok(net) = ipnet::Ipv6Net::new((*lo).into(), prefix) {
            nets.push(IpNet::V6(net.trunc()));
        }
    }
    nets
}

/// Pod ranges when nodes give none: the cover of the pod IPs seen.
pub fn pod_ip_cover(ips: &[IpAddr]) -> Vec<DiscoveredCidr> {
    cover(ips)
        .into_iter()
        .map(|net| DiscoveredCidr {
            net,
            source: CidrSource::PodIpCover { pods: ips.len() },
        })
        .collect()
}

/// The ranges of ServiceCIDR objects.
pub fn service_cidrs(objects: &[ServiceCIDR]) -> Vec<DiscoveredCidr> {
    objects
        .iter()
        .flat_map(|object| {
            let name = object.metadata.name.clone().unwrap_or_default();
            object
                .spec
                .iter()
                .flat_map(|spec| spec.cidrs.iter().flatten())
                .filter_map(|text| text.parse::<IpNet>().ok())
                .map(move |net| DiscoveredCidr {
                    net: net.trunc(),
                    source: CidrSource::ServiceCidr { name: name.clone() },
                })
        })
        .collect()
}

/// The ranges an apiserver lists when it refuses a clusterIP: "... The range of valid IPs is
/// 10.96.0.0/16" (several ranges separated by commas or spaces).
pub fn parse_refusal(message: &str) -> Vec<DiscoveredCidr> {
    const MARKER: &str = "range of valid ips is";
    let lower = message.to_ascii_lowercase();
    let Some(at) = lower.find(MARKER) else {
        return Vec::new();
    };
    message[at + MARKER.len()..]
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|word| !word.is_empty())
        .map(|word| word.trim_end_matches(['.', ';', '"', ']', ')']))
        .map_while(|word| word.parse::<IpNet>().ok())
        .map(|net| DiscoveredCidr {
            net: net.trunc(),
            source: CidrSource::DryRunRefusal,
        })
        .collect()
}

/// A clusterIP no cluster serves: in the IPv4 documentation range TEST-NET-1 (RFC 5737).
pub const OUT_OF_RANGE_CLUSTER_IP: &str = "192.0.2.1";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixture::fixture;

    fn items<T: serde::de::DeserializeOwned>(name: &str) -> Vec<T> {
        let list: serde_json::Value = fixture(name);
        serde_json::from_value(list["items"].clone()).unwrap()
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn recorded_nodes_give_their_pod_cidrs() {
        let nodes: Vec<Node> = items("nodes.json");
        let found = node_pod_cidrs(&nodes);
        assert_eq!(
            found,
            vec![DiscoveredCidr {
                net: net("10.244.0.0/24"),
                source: CidrSource::NodePodCidr {
                    node: "mrdc-node".into()
                }
            }]
        );
        assert_eq!(found[0].source.to_string(), "podCIDRs of node mrdc-node");
    }

    #[test]
    fn recorded_service_cidrs_are_read() {
        let objects: Vec<ServiceCIDR> = items("servicecidrs.json");
        let found = service_cidrs(&objects);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].net, net("10.96.0.0/16"));
        assert_eq!(found[0].source.to_string(), "ServiceCIDR kubernetes");
    }

    #[test]
    fn pod_ips_are_covered_per_family() {
        let ips: Vec<IpAddr> = ["10.244.1.7", "10.244.3.200", "fd00::1:5", "fd00::2:9"]
            .iter()
            .map(|ip| ip.parse().unwrap())
            .collect();
        assert_eq!(cover(&ips), vec![net("10.244.0.0/22"), net("fd00::/110")]);
        assert_eq!(cover(&ips[..1]), vec![net("10.244.1.7/32")]);
        assert!(cover(&[]).is_empty());
        assert_eq!(
            pod_ip_cover(&ips[..2])[0].source.to_string(),
            "cover of 2 pod IPs"
        );
    }

    #[test]
    fn refusal_messages_give_the_service_range() {
        let recorded: serde_json::Value = fixture("service-dry-run-refusal.json");
        let message = recorded["message"].as_str().unwrap();
        let found = parse_refusal(message);
        assert_eq!(
            found.iter().map(|d| d.net).collect::<Vec<_>>(),
            vec![net("10.96.0.0/16")]
        );
        let dual = "Service \"x\" is invalid: spec.clusterIPs: Invalid value: [\"192.0.2.1\"]: failed to allocate IP 192.0.2.1: the provided IP (192.0.2.1) is not in the valid range. The range of valid IPs is 10.96.0.0/12, fd00:10:96::/112.";
        assert_eq!(
            parse_refusal(dual)
                .iter()
                .map(|d| d.net)
                .collect::<Vec<_>>(),
            vec![net("10.96.0.0/12"), net("fd00:10:96::/112")]
        );
        assert!(parse_refusal("services \"x\" is forbidden").is_empty());
    }
}
