//! Which network destinations pond refuses to dial on a tenant's behalf: every range of the
//! IANA IPv4 and IPv6 Special-Purpose Address Registries (loopback, private, shared CGN space,
//! link-local, documentation, benchmarking, translation prefixes, …), plus multicast. One
//! policy for every place that connects where a consumer or sandboxed code says: the egress
//! proxy, `git_https` sources, and a model's base URL.
//!
//! Ranges whose registry entry says "globally reachable" (a few anycast blocks) are refused as
//! well: none is a place a build or an agent needs to go, and a shorter rule is easier to trust.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 range of the registry: network, prefix length, name.
type V4Range = (Ipv4Addr, u8, &'static str);
/// An IPv6 range: network, prefix length, name.
type V6Range = (Ipv6Addr, u8, &'static str);

/// IANA IPv4 Special-Purpose Address Registry (RFC 6890 and updates), and multicast.
pub const IPV4_SPECIAL: &[V4Range] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this network\" (RFC 791)"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private-use (RFC 1918)"),
    (Ipv4Addr::new(100, 64, 0, 0), 10, "shared address space (RFC 6598)"),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback (RFC 1122)"),
    (Ipv4Addr::new(169, 254, 0, 0), 16, "link-local (RFC 3927)"),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private-use (RFC 1918)"),
    (Ipv4Addr::new(192, 0, 0, 0), 24, "IETF protocol assignments (RFC 6890)"),
    (Ipv4Addr::new(192, 0, 2, 0), 24, "documentation TEST-NET-1 (RFC 5737)"),
    (Ipv4Addr::new(192, 31, 196, 0), 24, "AS112-v4 (RFC 7535)"),
    (Ipv4Addr::new(192, 52, 193, 0), 24, "AMT (RFC 7450)"),
    (Ipv4Addr::new(192, 88, 99, 0), 24, "deprecated 6to4 relay anycast (RFC 7526)"),
    (Ipv4Addr::new(192, 168, 0, 0), 16, "private-use (RFC 1918)"),
    (Ipv4Addr::new(192, 175, 48, 0), 24, "direct delegation AS112 (RFC 7534)"),
    (Ipv4Addr::new(198, 18, 0, 0), 15, "benchmarking (RFC 2544)"),
    (Ipv4Addr::new(198, 51, 100, 0), 24, "documentation TEST-NET-2 (RFC 5737)"),
    (Ipv4Addr::new(203, 0, 113, 0), 24, "documentation TEST-NET-3 (RFC 5737)"),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast (RFC 5771)"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved (RFC 1112)"),
    (Ipv4Addr::new(255, 255, 255, 255), 32, "limited broadcast (RFC 919)"),
];

/// IANA IPv6 Special-Purpose Address Registry (RFC 6890 and updates), site-local, multicast.
/// IPv4-mapped addresses are judged by the IPv4 address they carry (see [`special_purpose`]).
pub const IPV6_SPECIAL: &[V6Range] = &[
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1), 128, "loopback (RFC 4291)"),
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0), 96, "unspecified and IPv4-compatible (RFC 4291)"),
    (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96, "IPv4-IPv6 translation (RFC 6052)"),
    (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48, "local-use IPv4-IPv6 translation (RFC 8215)"),
    (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64, "discard-only (RFC 6666)"),
    (Ipv6Addr::new(0x100, 0, 0, 1, 0, 0, 0, 0), 64, "dummy IPv6 prefix (RFC 9780)"),
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23, "IETF protocol assignments (RFC 2928)"),
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32, "documentation (RFC 3849)"),
    (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16, "6to4 (RFC 3056)"),
    (Ipv6Addr::new(0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0), 48, "direct delegation AS112 (RFC 7534)"),
    (Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20, "documentation (RFC 9637)"),
    (Ipv6Addr::new(0x5f00, 0, 0, 0, 0, 0, 0, 0), 16, "segment routing SIDs (RFC 9602)"),
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7, "unique-local (RFC 4193)"),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10, "link-local unicast (RFC 4291)"),
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10, "site-local, deprecated (RFC 3879)"),
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8, "multicast (RFC 4291)"),
];

fn in_v4(ip: Ipv4Addr, (net, len, _): &V4Range) -> bool {
    let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(*net) & mask
}

fn in_v6(ip: Ipv6Addr, (net, len, _): &V6Range) -> bool {
    let mask = if *len == 0 { 0 } else { u128::MAX << (128 - len) };
    u128::from(ip) & mask == u128::from(*net) & mask
}

/// The special-purpose range `ip` belongs to (its name), or `None` for an ordinary global
/// address. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is judged by its IPv4 address.
pub fn special_purpose(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => IPV4_SPECIAL.iter().find(|r| in_v4(v4, r)).map(|r| r.2),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => special_purpose(IpAddr::V4(v4)),
            None => IPV6_SPECIAL.iter().find(|r| in_v6(v6, r)).map(|r| r.2),
        },
    }
}

/// Whether pond refuses to dial `ip` unless the operator allowed that address by literal.
pub fn is_internal(ip: IpAddr) -> bool {
    special_purpose(ip).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_last(net: Ipv4Addr, len: u8) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(net) | (u32::MAX.checked_shr(len as u32).unwrap_or(0)))
    }

    fn v6_last(net: Ipv6Addr, len: u8) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(net) | (u128::MAX.checked_shr(len as u32).unwrap_or(0)))
    }

    /// Every range of both registries: its first and last address are refused.
    #[test]
    fn every_special_purpose_range_is_refused_end_to_end() {
        for r in IPV4_SPECIAL {
            for ip in [r.0, v4_last(r.0, r.1)] {
                assert!(is_internal(IpAddr::V4(ip)), "{ip} in {}/{} ({})", r.0, r.1, r.2);
                let mapped = ip.to_ipv6_mapped();
                assert!(is_internal(IpAddr::V6(mapped)), "{mapped}");
            }
        }
        for r in IPV6_SPECIAL {
            for ip in [r.0, v6_last(r.0, r.1)] {
                assert!(is_internal(IpAddr::V6(ip)), "{ip} in {}/{} ({})", r.0, r.1, r.2);
            }
        }
    }

    /// The gaps an outside check found, and ordinary addresses that stay reachable.
    #[test]
    fn named_gaps_are_shut_and_public_addresses_open() {
        for internal in [
            "100.64.0.1",
            "100.127.255.254",
            "0.1.2.3",
            "192.0.0.170",
            "198.18.0.1",
            "198.19.255.255",
            "240.0.0.1",
            "169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "fec0::1",
            "fd00:ec2::254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in ["1.1.1.1", "151.101.0.1", "100.128.0.1", "198.20.0.1", "2606:4700::1111", "2a00:1450::1"] {
            assert_eq!(special_purpose(public.parse().unwrap()), None, "{public}");
        }
    }
}
