//! The CLI's side of the API: one HTTP/1.1 request per connection over the
//! daemon's Unix socket (hyper). API errors come back as [`ClientError::Api`]
//! carrying the daemon's one-line message.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, Method, Request};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use tokio::net::UnixStream;

use crate::api::ErrorBody;

/// Why a request did not get an answer the CLI can use.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "mqlb daemon is not running (no socket at {}); start it with `mqlb up --iface IF`",
        path.display()
    )]
    NotRunning { path: PathBuf },
    #[error("cannot connect to {}: permission denied (the API socket is root-only)", path.display())]
    Denied { path: PathBuf },
    #[error("cannot talk to the daemon at {}: {reason}", path.display())]
    Transport { path: PathBuf, reason: String },
    /// The daemon refused the request; `message` is its one-line reason.
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("unexpected answer from the daemon: {0}")]
    Decode(String),
}

/// A client of one daemon socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning {
                        path: self.socket.clone(),
                    }
                }
                std::io::ErrorKind::PermissionDenied => ClientError::Denied {
                    path: self.socket.clone(),
                },
                _ => ClientError::Transport {
                    path: self.socket.clone(),
                    reason: e.to_string(),
                },
            })
    }

    /// Whether a daemon answers on the socket.
    pub async fn is_running(&self) -> bool {
        self.connect().await.is_ok()
    }

    /// Sends one request; decodes a 2xx answer as `T`, anything else as an error.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        match self.call_full(method, path, body).await? {
            Ok(v) => Ok(v),
            Err((status, e)) => Err(ClientError::Api {
                status,
                message: e.error,
            }),
        }
    }

    /// Like [`Client::call`], but a refusal comes back whole: its status and
    /// its [`ErrorBody`] (with `at` for a refused apply).
    pub async fn call_full<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<Result<T, (u16, ErrorBody)>, ClientError> {
        let transport = |reason: String| ClientError::Transport {
            path: self.socket.clone(),
            reason,
        };
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).expect("request serializes")),
            None => Bytes::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "mqlb")
            .header("content-type", "application/json")
            .body(Full::new(bytes))
            .expect("request builds");
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(e.to_string()))?
            .to_bytes();
        conn.abort();
        if !status.is_success() {
            let error = serde_json::from_slice::<ErrorBody>(&body).unwrap_or_else(|_| ErrorBody {
                error: format!(
                    "daemon answered {status}: {}",
                    String::from_utf8_lossy(&body)
                ),
                at: None,
            });
            return Ok(Err((status.as_u16(), error)));
        }
        serde_json::from_slice(&body)
            .map(Ok)
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn patch<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<T, ClientError> {
        self.call(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None::<&()>).await
    }
}

/// A path segment with `/`, `%` and spaces escaped (names are already
/// restricted; addresses only hold `.`, `:` and hex digits).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '_' | '-' | ':' => out.push(c),
            _ => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn missing_socket_says_how_to_start_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mqlb.sock");
        let err = Client::new(&path)
            .get::<serde_json::Value>("/v1/status")
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "mqlb daemon is not running (no socket at {}); start it with `mqlb up --iface IF`",
                path.display()
            )
        );
        // A stale socket file (daemon killed) reads the same.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let err = Client::new(&path)
            .get::<serde_json::Value>("/v1/status")
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::NotRunning { .. }), "{err}");
    }

    #[tokio::test]
    async fn round_trip_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let core = crate::daemon::Core::new(
            crate::state::State::default(),
            crate::state::StateStore::new(dir.path()),
            Box::new(crate::dataplane::MemDataplane::default()),
            Default::default(),
        )
        .unwrap();
        let shared = crate::daemon::Shared::new(core);
        let listener = crate::daemon::bind_socket(&path).await.unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "root-only socket");
        let app = crate::api::router(Arc::clone(&shared));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let c = Client::new(&path);
        assert!(c.is_running().await);
        let spec = crate::state::ServiceSpec {
            name: "m".into(),
            vip: "10.0.0.10:4000".into(),
            proto: crate::state::Proto::Udp,
            hash: crate::state::Hash::Rtp,
            udp_idle_s: Some(300),
            ring_size: Some(13),
            health: Default::default(),
        };
        let svc: crate::state::Service = c.post("/v1/services", &spec).await.unwrap();
        assert_eq!((svc.id, svc.udp_idle_s), (1, 300));
        let err = c
            .post::<crate::state::Service>("/v1/services", &spec)
            .await
            .unwrap_err();
        match err {
            ClientError::Api { status, message } => {
                assert_eq!(
                    (status, message.as_str()),
                    (409, "service m already exists")
                )
            }
            e => panic!("{e}"),
        }
        // A second daemon on the same socket is refused.
        let err = crate::daemon::bind_socket(&path).await.unwrap_err();
        assert!(err.to_string().contains("already serves"), "{err}");
        server.abort();
    }

    #[test]
    fn segments_are_escaped() {
        assert_eq!(segment("amqp-1.x"), "amqp-1.x");
        assert_eq!(segment("fd00::1"), "fd00::1");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }
}
