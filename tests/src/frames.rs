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
    let outer = Ip4 {
        src: outer_src,
        dst: backend,
        proto: 4,
        tos: inner[1],
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
