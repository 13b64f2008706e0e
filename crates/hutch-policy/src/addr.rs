//! Address classification: which resolved addresses a sandbox may be connected to (public
//! unicast only), seeing through every IPv6 form that carries an IPv4 address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

/// What kind of address a resolved destination is. Everything but `Public` is refused unless
/// the operator pinned the name with `--resolve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AddrClass {
    Public,
    Loopback,
    /// RFC 1918, IPv6 unique-local fc00::/7, deprecated site-local fec0::/10.
    Private,
    /// 169.254/16 (cloud metadata lives here), fe80::/10.
    LinkLocal,
    /// 100.64/10 carrier-grade NAT.
    SharedAddressSpace,
    Multicast,
    Unspecified,
    Broadcast,
    /// TEST-NET-1/2/3, 2001:db8::/32, 3fff::/20.
    Documentation,
    /// 198.18/15, 2001:2::/48.
    Benchmarking,
    /// 0/8, 240/4, 192.0.0/24, 6to4 relay anycast, discard-only and other special-purpose blocks.
    Reserved,
    /// Teredo: the real endpoint hides behind an obfuscated IPv4 address.
    Tunnel,
    /// One of the host's own interface addresses.
    HostOwn,
}

impl AddrClass {
    pub fn is_public(self) -> bool {
        self == AddrClass::Public
    }
}

impl fmt::Display for AddrClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            AddrClass::Public => "public",
            AddrClass::Loopback => "loopback",
            AddrClass::Private => "private",
            AddrClass::LinkLocal => "link-local",
            AddrClass::SharedAddressSpace => "shared address space (CGNAT)",
            AddrClass::Multicast => "multicast",
            AddrClass::Unspecified => "unspecified",
            AddrClass::Broadcast => "broadcast",
            AddrClass::Documentation => "documentation",
            AddrClass::Benchmarking => "benchmarking",
            AddrClass::Reserved => "reserved",
            AddrClass::Tunnel => "IPv6 tunnel (Teredo)",
            AddrClass::HostOwn => "one of the host's own addresses",
        };
        f.write_str(s)
    }
}

/// Classifies `ip`; `host_addrs` are the host's own interface addresses.
pub fn classify(ip: IpAddr, host_addrs: &[IpAddr]) -> AddrClass {
    let class = match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    };
    if class != AddrClass::Public {
        return class;
    }
    let canon = canonical(ip);
    if host_addrs.iter().any(|h| canonical(*h) == canon) {
        return AddrClass::HostOwn;
    }
    AddrClass::Public
}

/// The IPv4 address an IPv6 address stands for when it is v4-mapped; otherwise itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    let table: &[([u8; 4], u32, AddrClass)] = &[
        ([255, 255, 255, 255], 32, AddrClass::Broadcast),
        ([0, 0, 0, 0], 32, AddrClass::Unspecified),
        ([0, 0, 0, 0], 8, AddrClass::Reserved),
        ([10, 0, 0, 0], 8, AddrClass::Private),
        ([100, 64, 0, 0], 10, AddrClass::SharedAddressSpace),
        ([127, 0, 0, 0], 8, AddrClass::Loopback),
        ([169, 254, 0, 0], 16, AddrClass::LinkLocal),
        ([172, 16, 0, 0], 12, AddrClass::Private),
        ([192, 0, 0, 0], 24, AddrClass::Reserved),
        ([192, 0, 2, 0], 24, AddrClass::Documentation),
        ([192, 88, 99, 0], 24, AddrClass::Reserved),
        ([192, 168, 0, 0], 16, AddrClass::Private),
        ([198, 18, 0, 0], 15, AddrClass::Benchmarking),
        ([198, 51, 100, 0], 24, AddrClass::Documentation),
        ([203, 0, 113, 0], 24, AddrClass::Documentation),
        ([224, 0, 0, 0], 4, AddrClass::Multicast),
        ([240, 0, 0, 0], 4, AddrClass::Reserved),
    ];
    for (net, prefix, class) in table {
        if in_v4(ip, *net, *prefix) {
            return *class;
        }
    }
    AddrClass::Public
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    };
    (u128::from(ip) & mask) == (u128::from(Ipv6Addr::from(net)) & mask)
}

fn v4_at(ip: Ipv6Addr, shift: u32) -> Ipv4Addr {
    Ipv4Addr::from(((u128::from(ip) >> shift) & 0xffff_ffff) as u32)
}

/// Embedded IPv4 addresses are judged as IPv4: a forbidden one makes the whole address forbidden.
fn embedded(v4: Ipv4Addr) -> AddrClass {
    classify_v4(v4)
}

fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    if ip.is_unspecified() {
        return AddrClass::Unspecified;
    }
    if ip.is_loopback() {
        return AddrClass::Loopback;
    }
    // ::ffff:a.b.c.d (mapped), ::ffff:0:a.b.c.d (SIIT translated), ::a.b.c.d (deprecated compat).
    if in_v6(ip, [0, 0, 0, 0, 0, 0xffff, 0, 0], 96)
        || in_v6(ip, [0, 0, 0, 0, 0xffff, 0, 0, 0], 96)
        || in_v6(ip, [0, 0, 0, 0, 0, 0, 0, 0], 96)
    {
        return embedded(v4_at(ip, 0));
    }
    // NAT64: the well-known prefix carries a public IPv4 address; the local-use prefix is local.
    if in_v6(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        return embedded(v4_at(ip, 0));
    }
    if in_v6(ip, [0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48) {
        return AddrClass::Private;
    }
    // 6to4 carries an IPv4 address in bits 16..48.
    if in_v6(ip, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
        return embedded(v4_at(ip, 80));
    }
    if in_v6(ip, [0x2001, 0, 0, 0, 0, 0, 0, 0], 32) {
        return AddrClass::Tunnel;
    }
    let table: &[([u16; 8], u32, AddrClass)] = &[
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, AddrClass::Multicast),
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, AddrClass::LinkLocal),
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, AddrClass::Private),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, AddrClass::Private),
        (
            [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0],
            32,
            AddrClass::Documentation,
        ),
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, AddrClass::Documentation),
        ([0x2001, 0x2, 0, 0, 0, 0, 0, 0], 48, AddrClass::Benchmarking),
        ([0x0100, 0, 0, 0, 0, 0, 0, 0], 64, AddrClass::Reserved),
        ([0x2001, 0x10, 0, 0, 0, 0, 0, 0], 28, AddrClass::Reserved),
        ([0x2001, 0x20, 0, 0, 0, 0, 0, 0], 28, AddrClass::Reserved),
        ([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16, AddrClass::Reserved),
    ];
    for (net, prefix, class) in table {
        if in_v6(ip, *net, *prefix) {
            return *class;
        }
    }
    // Only global unicast 2000::/3 is routable on the internet.
    if !in_v6(ip, [0x2000, 0, 0, 0, 0, 0, 0, 0], 3) {
        return AddrClass::Reserved;
    }
    AddrClass::Public
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> AddrClass {
        classify(s.parse().expect("test address"), &[])
    }

    /// Threat 8 (SSRF): every forbidden IPv4 range, including cloud metadata.
    #[test]
    fn threat8_ipv4_ranges() {
        let table = [
            ("127.0.0.1", AddrClass::Loopback),
            ("127.255.255.254", AddrClass::Loopback),
            ("10.0.0.1", AddrClass::Private),
            ("172.16.0.1", AddrClass::Private),
            ("172.31.255.255", AddrClass::Private),
            ("192.168.1.1", AddrClass::Private),
            ("169.254.169.254", AddrClass::LinkLocal),
            ("100.64.0.1", AddrClass::SharedAddressSpace),
            ("100.127.255.255", AddrClass::SharedAddressSpace),
            ("224.0.0.1", AddrClass::Multicast),
            ("239.255.255.250", AddrClass::Multicast),
            ("0.0.0.0", AddrClass::Unspecified),
            ("0.1.2.3", AddrClass::Reserved),
            ("255.255.255.255", AddrClass::Broadcast),
            ("240.0.0.1", AddrClass::Reserved),
            ("192.0.0.8", AddrClass::Reserved),
            ("192.0.2.1", AddrClass::Documentation),
            ("198.51.100.7", AddrClass::Documentation),
            ("203.0.113.9", AddrClass::Documentation),
            ("198.18.0.1", AddrClass::Benchmarking),
            ("198.19.255.255", AddrClass::Benchmarking),
            ("192.88.99.1", AddrClass::Reserved),
            ("8.8.8.8", AddrClass::Public),
            ("172.32.0.1", AddrClass::Public),
            ("100.128.0.1", AddrClass::Public),
            ("169.255.0.1", AddrClass::Public),
        ];
        for (addr, want) in table {
            assert_eq!(c(addr), want, "{addr}");
        }
    }

    /// Threat 8: IPv6 ranges, including the AWS IPv6 metadata address fd00:ec2::254.
    #[test]
    fn threat8_ipv6_ranges() {
        let table = [
            ("::1", AddrClass::Loopback),
            ("::", AddrClass::Unspecified),
            ("fd00:ec2::254", AddrClass::Private),
            ("fc00::1", AddrClass::Private),
            ("fec0::1", AddrClass::Private),
            ("fe80::1", AddrClass::LinkLocal),
            ("febf::1", AddrClass::LinkLocal),
            ("ff02::1", AddrClass::Multicast),
            ("2001:db8::1", AddrClass::Documentation),
            ("3fff::1", AddrClass::Documentation),
            ("2001:2::1", AddrClass::Benchmarking),
            ("100::1", AddrClass::Reserved),
            ("2001::1", AddrClass::Tunnel),
            ("64:ff9b:1::1", AddrClass::Private),
            ("4000::1", AddrClass::Reserved),
            ("2606:4700::1111", AddrClass::Public),
            ("2a00:1450:4001::1", AddrClass::Public),
        ];
        for (addr, want) in table {
            assert_eq!(c(addr), want, "{addr}");
        }
    }

    /// Threat 8: IPv6 spellings of forbidden IPv4 addresses (mapped, compat, NAT64, 6to4).
    #[test]
    fn threat8_embedded_ipv4_forms() {
        let table = [
            ("::ffff:127.0.0.1", AddrClass::Loopback),
            ("::ffff:7f00:1", AddrClass::Loopback),
            ("::ffff:169.254.169.254", AddrClass::LinkLocal),
            ("::ffff:10.1.2.3", AddrClass::Private),
            ("::ffff:0:127.0.0.1", AddrClass::Loopback),
            ("::127.0.0.1", AddrClass::Loopback),
            ("::a9fe:a9fe", AddrClass::LinkLocal),
            ("64:ff9b::127.0.0.1", AddrClass::Loopback),
            ("64:ff9b::a9fe:a9fe", AddrClass::LinkLocal),
            ("64:ff9b::192.168.0.1", AddrClass::Private),
            ("2002:7f00:1::", AddrClass::Loopback),
            ("2002:a9fe:a9fe::1", AddrClass::LinkLocal),
            ("2002:c0a8:0101::1", AddrClass::Private),
            ("::ffff:8.8.8.8", AddrClass::Public),
            ("64:ff9b::8.8.8.8", AddrClass::Public),
            ("2002:808:808::1", AddrClass::Public),
        ];
        for (addr, want) in table {
            assert_eq!(c(addr), want, "{addr}");
        }
    }

    /// Threat 8: the host's own addresses, in either family spelling.
    #[test]
    fn threat8_host_own_addresses() {
        let host: Vec<IpAddr> = vec![
            "93.184.216.34".parse().expect("addr"),
            "2606:2800:220:1::1".parse().expect("addr"),
        ];
        let cls = |s: &str| classify(s.parse().expect("addr"), &host);
        assert_eq!(cls("93.184.216.34"), AddrClass::HostOwn);
        assert_eq!(cls("::ffff:93.184.216.34"), AddrClass::HostOwn);
        assert_eq!(cls("2606:2800:220:1::1"), AddrClass::HostOwn);
        assert_eq!(cls("93.184.216.35"), AddrClass::Public);
        // Special ranges keep their own, more telling class.
        assert_eq!(
            classify(
                "127.0.0.1".parse().expect("addr"),
                &["127.0.0.1".parse().expect("addr")]
            ),
            AddrClass::Loopback
        );
    }
}
