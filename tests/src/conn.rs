//! TCP clients of the lab's servers ([`Lab::serve_tcp`], [`Lab::serve_tcp6`]):
//! connections from the client namespace through a VIP, each knowing the
//! backend that greeted it. Shared by the end-to-end test files.

use crate::lab::Lab;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Per-operation socket timeout: generous, only reached when a flow is lost.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

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
