//! Media traffic for the lab: RTP senders in the client namespace and
//! receivers on the relays that count packets per stream (SSRC) and check
//! sequence numbers, so a test sees exactly which relay got which stream,
//! whether anything was lost, and where a stream moved after a failover.
//!
//! RTP header (RFC 3550 §5.1): `V=2|P|X|CC` `M|PT` sequence(16) timestamp(32)
//! SSRC(32); RTCP (§6.4.1) sender reports carry their SSRC at bytes 4..8.

use crate::netns::in_netns;
use anyhow::{bail, Context as _, Result};
use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// RTP payload type 0 (PCMU): 8 kHz, 160 samples per 20 ms packet.
const PT_PCMU: u8 = 0;
const SAMPLES_PER_PACKET: u32 = 160;
/// Bytes of payload per packet (20 ms of PCMU).
const PAYLOAD: usize = 160;

/// An RTP packet with the given stream id and sequence number.
pub fn rtp_packet(ssrc: u32, seq: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + PAYLOAD);
    p.push(0x80); // V=2, no padding, no extension, no CSRC
    p.push(PT_PCMU);
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq).wrapping_mul(SAMPLES_PER_PACKET)).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.resize(12 + PAYLOAD, 0xff); // PCMU silence
    p
}

/// What a datagram is: RTP (SSRC, sequence) or RTCP (SSRC of the sender).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datagram {
    Rtp { ssrc: u32, seq: u16 },
    Rtcp { ssrc: u32 },
}

/// Classifies a datagram as RTP or RTCP (RFC 5761 §4: RTCP packet types
/// 200–204 sit where RTP's marker bit and payload type would be).
pub fn parse(d: &[u8]) -> Option<Datagram> {
    if d.len() < 8 || d[0] >> 6 != 2 {
        return None;
    }
    let word = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
    if (200..=204).contains(&d[1]) {
        return Some(Datagram::Rtcp { ssrc: word(4) });
    }
    if d.len() < 12 {
        return None;
    }
    Some(Datagram::Rtp {
        ssrc: word(8),
        seq: u16::from_be_bytes([d[2], d[3]]),
    })
}

/// One stream as a relay saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamSeen {
    pub packets: u64,
    pub rtcp: u64,
    /// First and last RTP sequence numbers seen (extended: no wrap within a test).
    pub first_seq: Option<u32>,
    pub last_seq: u32,
    /// Packets that arrived with a sequence number at or below the last one.
    pub out_of_order: u64,
    /// The client address the stream's RTP came from.
    pub from: Option<SocketAddr>,
    /// When the first packet arrived.
    pub first_at: Option<Instant>,
}

impl StreamSeen {
    fn rtp(&mut self, seq: u16, from: SocketAddr) {
        let seq = u32::from(seq);
        self.packets += 1;
        match self.first_seq {
            None => {
                self.first_seq = Some(seq);
                self.last_seq = seq;
                self.from = Some(from);
                self.first_at = Some(Instant::now());
            }
            Some(_) if seq <= self.last_seq => self.out_of_order += 1,
            Some(_) => self.last_seq = seq,
        }
    }

    /// Packets missing between the first and the last one seen.
    pub fn gaps(&self) -> u64 {
        match self.first_seq {
            Some(first) => u64::from(self.last_seq - first + 1).saturating_sub(self.packets),
            None => 0,
        }
    }
}

/// Per-SSRC counts of one relay.
pub type Seen = BTreeMap<u32, StreamSeen>;

/// A UDP receiver bound on a relay (in its namespace), counting per SSRC.
pub struct Receiver {
    pub relay: String,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Socket receive buffer of a receiver: a second of 1,000 streams at 50
/// packets/s with room to spare, so the receiver never drops what the LB sent.
const RCVBUF: usize = 32 << 20;

impl Receiver {
    /// Binds `addrs` inside the namespace at `netns` and counts what arrives.
    pub fn start(relay: &str, netns: &Path, addrs: &[SocketAddrV4]) -> Result<Receiver> {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &addr in addrs {
            let sock = in_netns(netns, move || -> Result<UdpSocket> {
                let s = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
                nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &RCVBUF)
                    .context("SO_RCVBUFFORCE")?;
                s.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(s)
            })??;
            let (seen, stop) = (seen.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("rtp-{relay}"))
                    .spawn(move || {
                        let mut buf = [0u8; 2048];
                        while !stop.load(Ordering::Relaxed) {
                            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                                continue;
                            };
                            let mut seen = seen.lock().expect("seen");
                            match parse(&buf[..n]) {
                                Some(Datagram::Rtp { ssrc, seq }) => {
                                    seen.entry(ssrc).or_default().rtp(seq, from)
                                }
                                Some(Datagram::Rtcp { ssrc }) => {
                                    seen.entry(ssrc).or_default().rtcp += 1
                                }
                                None => {}
                            }
                        }
                    })?,
            );
        }
        Ok(Receiver {
            relay: relay.to_string(),
            seen,
            stop,
            threads,
        })
    }

    /// A copy of the counts so far.
    pub fn seen(&self) -> Seen {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One RTP stream the sender plays: its socket (bound in the client
/// namespace to its own source port) and SSRC.
pub struct Stream {
    pub ssrc: u32,
    pub src: SocketAddrV4,
    sock: UdpSocket,
}

/// RTP senders in the client namespace, paced at `rate` packets/s each, on
/// one thread (a media gateway's shape: many streams, one sender loop).
pub struct Sender {
    stop: Arc<AtomicBool>,
    /// Packets sent per stream (index = stream).
    sent: Arc<Mutex<Vec<u64>>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
    pub streams: Vec<(u32, SocketAddrV4)>,
}

/// Opens `n` streams from `client` (even source ports from `first_port`)
/// in the namespace at `netns`; SSRC = `ssrc_base + i`.
pub fn open_streams(
    netns: &Path,
    client: std::net::Ipv4Addr,
    first_port: u16,
    n: usize,
    ssrc_base: u32,
) -> Result<Vec<Stream>> {
    if !first_port.is_multiple_of(2) {
        bail!("RTP streams start on even ports (got {first_port})");
    }
    in_netns(netns, move || {
        (0..n)
            .map(|i| {
                let port = first_port + 2 * i as u16;
                let src = SocketAddrV4::new(client, port);
                let sock = UdpSocket::bind(src).with_context(|| format!("bind {src}"))?;
                Ok(Stream {
                    ssrc: ssrc_base + i as u32,
                    src,
                    sock,
                })
            })
            .collect::<Result<Vec<_>>>()
    })?
}

impl Sender {
    /// Sends RTP on every stream to `dst`, `rate` packets/s each, until
    /// [`Sender::stop`]. Sequence numbers start at 1 and go up by one.
    pub fn start(streams: Vec<Stream>, dst: SocketAddrV4, rate: u32) -> Sender {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(vec![0u64; streams.len()]));
        let list = streams.iter().map(|s| (s.ssrc, s.src)).collect();
        let thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || -> Result<()> {
                // Stream i's k-th packet is due at start + (k + i/n) periods:
                // the streams are spread over each period as independent
                // callers would be, not sent in one burst.
                let period = Duration::from_secs(1) / rate;
                let n = streams.len().max(1) as u32;
                let start = Instant::now();
                let mut next: u64 = 0; // packets sent in all, in due order
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    loop {
                        let (tick, i) =
                            ((next / u64::from(n)) as u32, (next % u64::from(n)) as u32);
                        let due = start + period * tick + period * i / n;
                        if due > now {
                            break;
                        }
                        let s = &streams[i as usize];
                        let seq = (tick + 1) as u16;
                        s.sock
                            .send_to(&rtp_packet(s.ssrc, seq), dst)
                            .with_context(|| format!("send from {}", s.src))?;
                        sent.lock().expect("sent")[i as usize] += 1;
                        next += 1;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(())
            })
        };
        Sender {
            stop,
            sent,
            thread: Some(thread),
            streams: list,
        }
    }

    /// Packets sent so far per stream.
    pub fn sent(&self) -> Vec<u64> {
        self.sent.lock().expect("sent").clone()
    }

    /// Stops sending; an error if a send failed.
    pub fn stop(&mut self) -> Result<Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("the sender thread panicked"))??;
        }
        Ok(self.sent())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtp_round_trips_and_rtcp_is_told_apart() {
        let p = rtp_packet(0xdead_beef, 513);
        assert_eq!(p.len(), 172);
        assert_eq!(&p[..4], &[0x80, 0, 0x02, 0x01]);
        assert_eq!(&p[4..8], &(513u32 * 160).to_be_bytes());
        assert_eq!(
            parse(&p),
            Some(Datagram::Rtp {
                ssrc: 0xdead_beef,
                seq: 513
            })
        );
        // An RTCP sender report (PT 200, length 6) from SSRC 7.
        let sr = [0x80, 200, 0, 6, 0, 0, 0, 7, 0, 0, 0, 0];
        assert_eq!(parse(&sr), Some(Datagram::Rtcp { ssrc: 7 }));
        assert_eq!(parse(&[0x40, 0, 0, 0, 0, 0, 0, 0]), None, "version 1");
        assert_eq!(parse(&p[..6]), None, "short");
    }

    #[test]
    fn gaps_and_reordering_are_counted() {
        let from: SocketAddr = "10.0.0.2:4000".parse().unwrap();
        let mut s = StreamSeen::default();
        for seq in [5, 6, 7, 10, 9, 11] {
            s.rtp(seq, from);
        }
        assert_eq!(s.packets, 6);
        assert_eq!((s.first_seq, s.last_seq), (Some(5), 11));
        assert_eq!(s.out_of_order, 1, "9 after 10");
        assert_eq!(s.gaps(), 1, "8 never came");
    }
}
