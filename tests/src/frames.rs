//! Test frames built field by field, independent of the code under test:
//! the checksum here is its own RFC 1071 loop, not lb-common's.

pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const BACKEND_MACS: [[u8; 6]; 4] = [
    [0x02, 0, 0, 0, 0, 0x11],
    [0x02, 0, 0, 0, 0, 0x12],
    [0x02, 0, 0, 0, 0, 0x13],
    [0x02, 0, 0, 0, 0, 0x14],
];

/// RFC 1071 checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 header fields a test sets.
#[derive(Clone, Debug)]
pub struct Ip4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    pub tos: u8,
    pub ttl: u8,
    pub ident: u16,
    /// Flags + fragment offset (0x4000 = DF).
    pub frag: u16,
    /// IP options (padded by the caller to a multiple of 4).
    pub options: Vec<u8>,
}

impl Ip4 {
    pub fn new(src: [u8; 4], dst: [u8; 4], proto: u8) -> Ip4 {
        Ip4 {
            src,
            dst,
            proto,
            tos: 0,
            ttl: 64,
            ident: 0x1234,
            frag: 0x4000,
            options: vec![],
        }
    }

    /// The header for a payload of `payload_len` bytes, checksum filled in.
    pub fn header(&self, payload_len: usize) -> Vec<u8> {
        let ihl = 5 + self.options.len() / 4;
        let total = (ihl * 4 + payload_len) as u16;
        let mut h = vec![(0x40 | ihl) as u8, self.tos];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&self.ident.to_be_bytes());
        h.extend_from_slice(&self.frag.to_be_bytes());
        h.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
        h.extend_from_slice(&self.src);
        h.extend_from_slice(&self.dst);
        h.extend_from_slice(&self.options);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }
}

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut e = dst.to_vec();
    e.extend_from_slice(&src);
    e.extend_from_slice(&ethertype.to_be_bytes());
    e
}

fn l4_checksum(ip: &Ip4, segment: &[u8]) -> u16 {
    let mut pseudo = ip.src.to_vec();
    pseudo.extend_from_slice(&ip.dst);
    pseudo.extend_from_slice(&[0, ip.proto]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    checksum(&pseudo)
}

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const PSH: u8 = 0x08;

/// A TCP segment (20-byte header) with a correct checksum.
pub fn tcp(ip: &Ip4, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&1000u32.to_be_bytes());
    s.extend_from_slice(&(if flags & ACK != 0 { 2000u32 } else { 0 }).to_be_bytes());
    s.extend_from_slice(&[0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    s.extend_from_slice(payload);
    let c = l4_checksum(ip, &s);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

/// A UDP datagram with a correct checksum.
pub fn udp(ip: &Ip4, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    let c = l4_checksum(ip, &s);
    s[6..8].copy_from_slice(&c.to_be_bytes());
    s
}

/// Ethernet + IPv4 + `segment`, from the client to the LB's MAC.
pub fn frame(ip: &Ip4, segment: &[u8]) -> Vec<u8> {
    let mut f = eth(LB_MAC, CLIENT_MAC, 0x0800);
    f.extend_from_slice(&ip.header(segment.len()));
    f.extend_from_slice(segment);
    f
}

/// What mqlb must send for `inner` (an IPv4 packet without Ethernet header):
/// Ethernet to the backend, an outer IPv4 header (proto 4, DF, TTL 64, TOS
/// copied, id 0), then `inner` unchanged.
pub fn ipip_expected(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    outer_src: [u8; 4],
    backend: [u8; 4],
    inner: &[u8],
) -> Vec<u8> {
    ip4_tunnel(src_mac, dst_mac, outer_src, backend, 4, inner[1], inner)
}

/// Ethernet + the outer IPv4 header mqlb writes (DF, TTL 64, id 0) + `inner`.
fn ip4_tunnel(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    outer_src: [u8; 4],
    backend: [u8; 4],
    proto: u8,
    tos: u8,
    inner: &[u8],
) -> Vec<u8> {
    let outer = Ip4 {
        src: outer_src,
        dst: backend,
        proto,
        tos,
        ttl: 64,
        ident: 0,
        frag: 0x4000,
        options: vec![],
    };
    let mut f = eth(dst_mac, src_mac, 0x0800);
    f.extend_from_slice(&outer.header(inner.len()));
    f.extend_from_slice(inner);
    f
}

/// An IPv6 extension header a test puts between the fixed header and the
/// transport header: its type and its bytes after the next-header byte
/// (length byte first), which the caller makes a multiple of 8 long minus 1.
#[derive(Clone, Debug)]
pub struct Ext6 {
    pub kind: u8,
    pub body: Vec<u8>,
}

impl Ext6 {
    /// Hop-by-hop options: one PadN option filling 8 bytes.
    pub fn hop_by_hop() -> Ext6 {
        Ext6 {
            kind: 0,
            body: vec![0, 1, 4, 0, 0, 0, 0],
        }
    }
    /// Destination options: one PadN option filling 8 bytes.
    pub fn dest_opts() -> Ext6 {
        Ext6 {
            kind: 60,
            body: vec![0, 1, 4, 0, 0, 0, 0],
        }
    }
    /// A routing header of type 4 (segment routing) with one segment
    /// (`addr`) and `segments_left`.
    pub fn routing(segments_left: u8, addr: [u8; 16]) -> Ext6 {
        let mut body = vec![2, 4, segments_left, 0, 0, 0, 0];
        body.extend_from_slice(&addr);
        Ext6 { kind: 43, body }
    }
    /// A fragment header: offset in 8-byte units, more-fragments flag.
    pub fn fragment(offset: u16, more: bool) -> Ext6 {
        let off_m = (offset << 3) | more as u16;
        let [a, b] = off_m.to_be_bytes();
        Ext6 {
            kind: 44,
            body: vec![0, a, b, 0, 0, 0x12, 0x34],
        }
    }
}

/// IPv6 header fields a test sets; `next_header` is the transport protocol,
/// after `ext` (in order).
#[derive(Clone, Debug)]
pub struct Ip6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub next_header: u8,
    pub tc: u8,
    pub flow_label: u32,
    pub hop_limit: u8,
    pub ext: Vec<Ext6>,
}

impl Ip6 {
    pub fn new(src: [u8; 16], dst: [u8; 16], next_header: u8) -> Ip6 {
        Ip6 {
            src,
            dst,
            next_header,
            tc: 0,
            flow_label: 0,
            hop_limit: 64,
            ext: vec![],
        }
    }

    /// The fixed header and the extension headers, for an upper-layer
    /// payload of `payload_len` bytes.
    pub fn header(&self, payload_len: usize) -> Vec<u8> {
        let ext_len: usize = self.ext.iter().map(|e| 1 + e.body.len()).sum();
        let first = self.ext.first().map_or(self.next_header, |e| e.kind);
        let mut h = vec![
            0x60 | (self.tc >> 4),
            (self.tc << 4) | ((self.flow_label >> 16) as u8 & 0x0f),
            (self.flow_label >> 8) as u8,
            self.flow_label as u8,
        ];
        h.extend_from_slice(&((ext_len + payload_len) as u16).to_be_bytes());
        h.extend_from_slice(&[first, self.hop_limit]);
        h.extend_from_slice(&self.src);
        h.extend_from_slice(&self.dst);
        for (i, e) in self.ext.iter().enumerate() {
            h.push(self.ext.get(i + 1).map_or(self.next_header, |n| n.kind));
            h.extend_from_slice(&e.body);
        }
        h
    }
}

/// The RFC 8200 pseudo-header checksum of an upper-layer packet.
pub fn checksum6(src: &[u8; 16], dst: &[u8; 16], next_header: u8, upper: &[u8]) -> u16 {
    let mut b = src.to_vec();
    b.extend_from_slice(dst);
    b.extend_from_slice(&(upper.len() as u32).to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, next_header]);
    b.extend_from_slice(upper);
    checksum(&b)
}

/// A TCP segment (20-byte header) over IPv6 with a correct checksum.
pub fn tcp6(ip: &Ip6, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let v4 = Ip4::new([0; 4], [0; 4], 6);
    let mut s = tcp(&v4, sport, dport, flags, payload);
    s[16..18].copy_from_slice(&[0, 0]);
    let c = checksum6(&ip.src, &ip.dst, 6, &s);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

/// A UDP datagram over IPv6 with a correct checksum.
pub fn udp6(ip: &Ip6, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let v4 = Ip4::new([0; 4], [0; 4], 17);
    let mut s = udp(&v4, sport, dport, payload);
    s[6..8].copy_from_slice(&[0, 0]);
    let c = checksum6(&ip.src, &ip.dst, 17, &s);
    s[6..8].copy_from_slice(&c.to_be_bytes());
    s
}

/// An ICMPv6 message (type, code, the 4 bytes after the checksum, body)
/// with a correct checksum.
pub fn icmp6(ip: &Ip6, kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut s = vec![kind, code, 0, 0];
    s.extend_from_slice(&rest);
    s.extend_from_slice(body);
    let c = checksum6(&ip.src, &ip.dst, 58, &s);
    s[2..4].copy_from_slice(&c.to_be_bytes());
    s
}

/// Ethernet + IPv6 + `segment`, from the client to the LB's MAC.
pub fn frame6(ip: &Ip6, segment: &[u8]) -> Vec<u8> {
    let mut f = eth(LB_MAC, CLIENT_MAC, 0x86dd);
    f.extend_from_slice(&ip.header(segment.len()));
    f.extend_from_slice(segment);
    f
}

/// What mqlb must send for `inner` (an IPv4 or IPv6 packet without Ethernet
/// header) to an IPv6 backend: Ethernet to the backend, an outer IPv6 header
/// (next header 4 or 41 by the inner version, hop limit 64, traffic class
/// copied from the inner packet, `flow_label`), then `inner` unchanged.
pub fn ip6_tunnel_expected(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    outer_src: [u8; 16],
    backend: [u8; 16],
    flow_label: u32,
    inner: &[u8],
) -> Vec<u8> {
    let (next_header, tc) = match inner[0] >> 4 {
        4 => (4, inner[1]),
        6 => (41, (inner[0] << 4) | (inner[1] >> 4)),
        v => panic!("inner IP version {v}"),
    };
    let outer = Ip6 {
        src: outer_src,
        dst: backend,
        next_header,
        tc,
        flow_label,
        hop_limit: 64,
        ext: vec![],
    };
    let mut f = eth(dst_mac, src_mac, 0x86dd);
    f.extend_from_slice(&outer.header(inner.len()));
    f.extend_from_slice(inner);
    f
}

/// What mqlb must send for an IPv6 packet `inner` to an IPv4 backend: an
/// outer IPv4 header as [`ipip_expected`]'s, with protocol 41, TOS = the
/// inner traffic class.
pub fn ip6_in_ip4_expected(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    outer_src: [u8; 4],
    backend: [u8; 4],
    inner: &[u8],
) -> Vec<u8> {
    let tc = (inner[0] << 4) | (inner[1] >> 4);
    ip4_tunnel(src_mac, dst_mac, outer_src, backend, 41, tc, inner)
}
