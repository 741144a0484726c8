//! TCP clients of the lab's servers ([`Lab::serve_tcp`], [`Lab::serve_tcp6`]):
//! connections from the client namespace through a VIP, each knowing the
//! backend that greeted it. Shared by the end-to-end test files.

use crate::lab::{fnv1a64, Lab, FNV_OFFSET};
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Per-operation socket timeout: generous, only reached when a flow is lost.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket timeout of a [`Conn::bulk`] transfer: path-MTU discovery may stall
/// it for a few retransmission timeouts before the segments fit.
pub const BULK_TIMEOUT: Duration = Duration::from_secs(30);

/// `len` bytes of a fixed pseudo-random pattern (xorshift64): the same in
/// every run, and no long runs a broken path could get right by chance.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// One client TCP connection through the VIP and the backend that took it.
pub struct Conn {
    pub stream: TcpStream,
    pub reader: BufReader<TcpStream>,
    /// The client's side of the flow (what the LB hashes).
    pub src: SocketAddr,
    /// Backend name from the server's greeting.
    pub backend: String,
}

impl Conn {
    /// The next line from the backend, without its newline.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap_or_else(|e| {
            panic!(
                "no answer on flow {} within the socket timeout: {e}",
                self.src
            )
        });
        assert!(n > 0, "flow {} closed by the far end", self.src);
        line.trim_end().to_string()
    }

    /// Sends `msg`, returns the name of the backend that echoed it.
    pub fn ask(&mut self, msg: &str) -> String {
        self.stream
            .write_all(format!("{msg}\n").as_bytes())
            .unwrap_or_else(|e| panic!("send on {} ({}): {e}", self.src, self.backend));
        let line = self.line();
        let (name, echoed) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("bad reply {line:?}"));
        assert_eq!(echoed, msg, "flow {} got someone else's answer", self.src);
        name.to_string()
    }

    /// Sends `BULK n` and the n bytes of `data` (the lab servers hash what
    /// they read), with [`BULK_TIMEOUT`] on the socket. Returns the
    /// backend's answer and the one intact bytes get,
    /// `<backend> BULK n <fnv1a64 hex>`; an error if the send stalled.
    pub fn bulk(&mut self, data: &[u8]) -> std::io::Result<(String, String)> {
        self.stream.set_write_timeout(Some(BULK_TIMEOUT))?;
        self.stream.set_read_timeout(Some(BULK_TIMEOUT))?;
        let len = data.len();
        self.stream.write_all(format!("BULK {len}\n").as_bytes())?;
        self.stream.write_all(data)?;
        let want = format!(
            "{} BULK {len} {:016x}",
            self.backend,
            fnv1a64(FNV_OFFSET, data)
        );
        Ok((self.line(), want))
    }
}

/// Opens `n` connections to `dst` from the client namespace, reads each
/// greeting (`HELLO <backend> <its local addr> <client addr>`) and checks
/// that the backend accepted on `dst` and saw the client's own address and
/// port (no NAT: direct server return keeps the client tuple).
pub fn open_conns(lab: &Lab, dst: SocketAddr, n: usize) -> Vec<Conn> {
    let streams = lab
        .client
        .run(move || {
            (0..n)
                .map(|i| {
                    TcpStream::connect_timeout(&dst, IO_TIMEOUT)
                        .map_err(|e| format!("connection {i} to {dst}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .expect("client namespace")
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.diagnostics()));
    streams
        .into_iter()
        .map(|stream| {
            stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            // One segment per message, no Nagle wait for the previous ACK.
            stream.set_nodelay(true).unwrap();
            stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
            let src = stream.local_addr().unwrap();
            let reader = BufReader::new(stream.try_clone().unwrap());
            let mut c = Conn {
                stream,
                reader,
                src,
                backend: String::new(),
            };
            let hello = c.line();
            let parts: Vec<&str> = hello.split(' ').collect();
            assert!(
                parts.len() == 4 && parts[0] == "HELLO",
                "bad greeting {hello:?}"
            );
            assert_eq!(parts[2], dst.to_string(), "the backend accepted on the VIP");
            assert_eq!(
                parts[3],
                src.to_string(),
                "the backend sees the client's own address and port"
            );
            c.backend = parts[1].to_string();
            c
        })
        .collect()
}
