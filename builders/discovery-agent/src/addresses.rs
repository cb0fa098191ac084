//! The machine's IP addresses, as `udhcpc` (run by `/init` before the agent) configured them,
//! so an operator sees where a discovered machine can be reached.

use std::net::IpAddr;

/// The server's bound on the number of addresses.
pub const MAX_ADDRESSES: usize = 64;

/// The addresses of all interfaces that identify the machine on a network. `getifaddrs`
/// failing only costs the report its addresses, so it yields an empty list.
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(ifaddrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let found = ifaddrs.filter_map(|ifaddr| {
        let address = ifaddr.address?;
        if let Some(v4) = address.as_sockaddr_in() {
            Some(IpAddr::V4(v4.ip()))
        } else {
            address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        }
    });
    reportable(found)
}

/// Drops what says nothing about where the machine is (loopback, unspecified, IPv6
/// link-local, which every interface has) and duplicates; keeps at most [`MAX_ADDRESSES`].
pub fn reportable(addresses: impl IntoIterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut kept = Vec::new();
    for ip in addresses {
        let link_local_v6 = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
        if ip.is_loopback() || ip.is_unspecified() || link_local_v6 || kept.contains(&ip) {
            continue;
        }
        if kept.len() == MAX_ADDRESSES {
            break;
        }
        kept.push(ip);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_routable_addresses_once() {
        let input = ["127.0.0.1", "10.0.0.5", "::1", "fe80::1", "2001:db8::5", "10.0.0.5", "::"];
        let got = reportable(input.iter().map(|s| s.parse().unwrap()));
        let want: Vec<IpAddr> =
            ["10.0.0.5", "2001:db8::5"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn at_most_the_servers_bound() {
        let many = (0..100u8).map(|i| IpAddr::from([10, 0, 1, i]));
        assert_eq!(reportable(many).len(), MAX_ADDRESSES);
    }

    #[test]
    fn reads_this_machines_addresses() {
        // Whatever the test host has, the result obeys the bounds.
        let got = local_addresses();
        assert!(got.len() <= MAX_ADDRESSES);
        assert!(got.iter().all(|ip| !ip.is_loopback()));
    }
}
