//! The daemon's HTTP/JSON API on its Unix socket (root-only, mode 0600).
//! The CLI is one client; `curl --unix-socket /run/mqlb/mqlb.sock` another.
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /v1/status` | | [`StatusView`] |
//! | `GET /v1/services` | | `[ServiceView]` |
//! | `POST /v1/services` | [`ServiceSpec`] | 201 [`ServiceView`] |
//! | `GET /v1/services/{name}` | | `ServiceView` |
//! | `PATCH /v1/services/{name}` | [`ServiceUpdate`] | `ServiceView` |
//! | `DELETE /v1/services/{name}` | | the deleted `ServiceView` |
//! | `GET /v1/services/{name}/backends` | | `[BackendView]` |
//! | `POST /v1/services/{name}/backends` | [`BackendSpec`] | 201 `Backend` |
//! | `PATCH /v1/services/{name}/backends/{ip}` | [`BackendUpdate`] | `Backend` |
//! | `DELETE /v1/services/{name}/backends/{ip}` | | the deleted `Backend` |
//! | `GET /v1/services/{name}/flow?client=IP:PORT[&port=P]` | | [`FlowView`] |
//! | `GET /v1/stats` | | [`StatsView`] |
//! | `POST /v1/apply` | [`ApplyRequest`] | [`ApplyReply`] |
//! | `GET /v1/export` | | [`Desired`] (password `***`) |
//! | `POST /v1/shutdown` | [`ShutdownRequest`] | [`ShutdownReply`] |
//!
//! Errors are `{"error": "one lowercase line"}` with a 4xx status for a
//! request a person got wrong (404 unknown, 409 conflict, 400 invalid) and
//! 500 when the daemon failed. A refused apply adds `"at"`: the service and
//! backend (indexes in the request) and the field, so a client can name the
//! line of its file.
//!
//! `POST /v1/apply` replaces every service at once (see [`crate::manifest`]):
//! validated whole, saved once, written in one plan, or refused with nothing
//! changed. With `"dry_run": true` it only answers the changes.
//!
//! A service's health check password is never sent back: it reads `***`.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, sync::Arc};

use axum::{
    extract::{rejection::JsonRejection, Path, RawQuery, State as AxState},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, patch, post},
    Json, Router,
};
use serde::{Deserialize, Serialize};

use crate::{
    daemon::{error_chain, CoreError, Shared},
    health::HealthView,
    loader::Attached,
    manifest::{ApplyReply, ApplyRequest, Desired, Loc},
    probe::FlowView,
    state::{
        Backend, BackendSpec, BackendState, BackendUpdate, Proto, Service, ServiceSpec,
        ServiceUpdate, Vip,
    },
};

/// A service as the API shows it: its settings (check password `***`),
/// whether it is in panic mode, and how many backends its table holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    #[serde(flatten)]
    pub service: Service,
    /// Too few backends pass their check: the table holds the down ones too.
    pub panic: bool,
    /// Backends in the Maglev table (taking new flows).
    pub in_table: usize,
}

/// A backend as the API shows it, with its health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    #[serde(flatten)]
    pub backend: Backend,
    /// In the Maglev table (taking new flows).
    pub in_table: bool,
    /// `None` when the service is not checked.
    pub health: Option<HealthView>,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub iface: String,
    pub ifindex: u32,
    pub pid: u32,
    pub attached: Attached,
    pub prog_id: u32,
    pub ct_entries: u32,
    pub pins: PathBuf,
    pub state_file: PathBuf,
    pub socket: PathBuf,
    pub seed: u32,
    pub services: usize,
    pub backends: usize,
    pub removed_backends: usize,
    /// Backends whose neighbour is not resolved (the program uses the FIB).
    pub unresolved: Vec<String>,
}

impl Default for StatusView {
    fn default() -> Self {
        StatusView {
            iface: String::new(),
            ifindex: 0,
            pid: 0,
            attached: Attached::Replaced,
            prog_id: 0,
            ct_entries: 0,
            pins: PathBuf::new(),
            state_file: PathBuf::new(),
            socket: PathBuf::new(),
            seed: 0,
            services: 0,
            backends: 0,
            removed_backends: 0,
            unresolved: Vec::new(),
        }
    }
}

/// `GET /v1/stats`: counters summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    /// `lb_common::Counter` name → packets.
    pub counters: BTreeMap<String, u64>,
    /// `lb_common::DropReason` name → packets.
    pub drops: BTreeMap<String, u64>,
    pub services: Vec<ServiceStats>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStats {
    pub name: String,
    pub id: u32,
    pub vip: Vip,
    pub proto: Proto,
    /// Too few backends pass their check: the table holds the down ones too.
    pub panic: bool,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub backends: Vec<BackendStats>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStats {
    pub addr: IpAddr,
    pub id: u32,
    pub state: BackendState,
    pub weight: u32,
    /// In the Maglev table (taking new flows).
    pub in_table: bool,
    /// `None` when the service is not checked.
    pub health: Option<HealthView>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// `POST /v1/shutdown`: stop the daemon (used by `mqlb down`). With `iface`,
/// refused unless the daemon serves that interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownRequest {
    #[serde(default)]
    pub iface: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownReply {
    pub iface: String,
    pub pid: u32,
}

/// An error answer: `{"error": message}`, plus `"at"` for a refused apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// Where in the `POST /v1/apply` request the problem is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Loc>,
}

/// An error with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub at: Option<Loc>,
}

impl ApiError {
    fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: message.into(),
            at: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
                at: self.at,
            }),
        )
            .into_response()
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> ApiError {
        if e.status() >= 500 {
            tracing::error!(error = %error_chain(&e), "api request failed");
        }
        let mut err = ApiError::new(e.status(), error_chain(&e));
        if let CoreError::Apply(a) = &e {
            err.at = Some(a.at.clone()).filter(|at| *at != Loc::default());
        }
        err
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> ApiError {
        ApiError::new(
            e.status().as_u16(),
            format!("bad request body: {}", e.body_text()),
        )
    }
}

type ApiResult<T> = Result<T, ApiError>;
type St = AxState<Arc<Shared>>;

/// The API's routes over the daemon's shared state.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/services", get(list_services).post(add_service))
        .route(
            "/v1/services/{name}",
            get(get_service).patch(set_service).delete(del_service),
        )
        .route(
            "/v1/services/{name}/backends",
            get(list_backends).post(add_backend),
        )
        .route(
            "/v1/services/{name}/backends/{addr}",
            patch(set_backend).delete(del_backend),
        )
        .route("/v1/services/{name}/flow", get(flow))
        .route("/v1/stats", get(stats))
        .route("/v1/apply", post(apply))
        .route("/v1/export", get(export))
        .route("/v1/shutdown", post(shutdown))
        .fallback(|| async { ApiError::new(404, "no such endpoint (see /v1/status)") })
        .with_state(shared)
}

async fn status(AxState(s): St) -> Json<StatusView> {
    Json(s.core.lock().await.status())
}

async fn list_services(AxState(s): St) -> impl IntoResponse {
    Json(s.core.lock().await.service_views())
}

async fn add_service(
    AxState(s): St,
    body: Result<Json<ServiceSpec>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(spec) = body?;
    let mut core = s.core.lock().await;
    let svc = core.add_service(&spec)?;
    Ok((StatusCode::CREATED, Json(core.service_view(&svc))))
}

async fn get_service(AxState(s): St, Path(name): Path<String>) -> ApiResult<impl IntoResponse> {
    let core = s.core.lock().await;
    let svc = core.service(&name)?;
    Ok(Json(core.service_view(&svc)))
}

async fn set_service(
    AxState(s): St,
    Path(name): Path<String>,
    body: Result<Json<ServiceUpdate>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(update) = body?;
    let mut core = s.core.lock().await;
    let svc = core.set_service(&name, &update)?;
    Ok(Json(core.service_view(&svc)))
}

async fn del_service(AxState(s): St, Path(name): Path<String>) -> ApiResult<impl IntoResponse> {
    let mut core = s.core.lock().await;
    let svc = core.del_service(&name)?;
    Ok(Json(ServiceView {
        service: svc.redacted(),
        panic: false,
        in_table: 0,
    }))
}

async fn list_backends(AxState(s): St, Path(name): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.core.lock().await.backend_views(&name)?))
}

async fn add_backend(
    AxState(s): St,
    Path(name): Path<String>,
    body: Result<Json<BackendSpec>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(spec) = body?;
    let b = s.core.lock().await.add_backend(&name, &spec)?;
    s.poke.notify_one();
    Ok((StatusCode::CREATED, Json(b)))
}

async fn set_backend(
    AxState(s): St,
    Path((name, addr)): Path<(String, String)>,
    body: Result<Json<BackendUpdate>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(update) = body?;
    Ok(Json(
        s.core.lock().await.set_backend(&name, &addr, &update)?,
    ))
}

async fn del_backend(
    AxState(s): St,
    Path((name, addr)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.core.lock().await.del_backend(&name, &addr)?))
}

async fn apply(
    AxState(s): St,
    body: Result<Json<ApplyRequest>, JsonRejection>,
) -> ApiResult<Json<ApplyReply>> {
    let Json(req) = body?;
    let reply = s.core.lock().await.apply(&req.desired, req.dry_run)?;
    if reply.applied && !reply.changes.is_empty() {
        // New backends get their next hop now rather than at the next round.
        s.poke.notify_one();
    }
    Ok(Json(reply))
}

async fn export(AxState(s): St) -> Json<Desired> {
    Json(crate::manifest::export(s.core.lock().await.state()))
}

/// The value of `key` in a query string (`%XX` decoded; `+` is a space).
pub fn query_param(query: &str, key: &str) -> Option<String> {
    let raw = query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?;
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'%' if i + 2 < bytes.len() => hex(bytes[i + 1]).zip(hex(bytes[i + 2])),
            _ => None,
        };
        match (decoded, bytes[i]) {
            (Some((hi, lo)), _) => {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

async fn flow(
    AxState(s): St,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<FlowView>> {
    let client = query
        .as_deref()
        .and_then(|q| query_param(q, "client"))
        .ok_or_else(|| ApiError::new(400, "missing query parameter client=IP:PORT"))?;
    let port = match query.as_deref().and_then(|q| query_param(q, "port")) {
        None => None,
        Some(p) => {
            Some(crate::probe::parse_port(&p).map_err(|e| ApiError::new(400, e.to_string()))?)
        }
    };
    Ok(Json(s.core.lock().await.flow(&name, &client, port)?))
}

async fn stats(AxState(s): St) -> ApiResult<Json<StatsView>> {
    let core = s.core.lock().await;
    core.stats()
        .map(Json)
        .map_err(|e| ApiError::new(500, format!("reading counters failed: {}", error_chain(&e))))
}

async fn shutdown(
    AxState(s): St,
    body: Result<Json<ShutdownRequest>, JsonRejection>,
) -> ApiResult<Json<ShutdownReply>> {
    let Json(req) = body?;
    let status = s.core.lock().await.status();
    if let Some(iface) = req.iface {
        if iface != status.iface {
            return Err(ApiError::new(
                409,
                format!(
                    "the daemon on {} serves {}, not {iface}",
                    status.socket.display(),
                    status.iface
                ),
            ));
        }
    }
    s.shutdown.send_replace(true);
    Ok(Json(ShutdownReply {
        iface: status.iface,
        pid: status.pid,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        daemon::Core,
        dataplane::MemDataplane,
        state::{State, StateStore},
    };
    use axum::body::Body;
    use http_body_util::BodyExt as _;
    use std::collections::BTreeSet;
    use tower::ServiceExt as _;

    struct T {
        app: Router,
        shared: Arc<Shared>,
        _dir: tempfile::TempDir,
    }

    fn app() -> T {
        let dir = tempfile::tempdir().unwrap();
        let status = StatusView {
            iface: "eth9".into(),
            pid: 42,
            ..Default::default()
        };
        let core = Core::new(
            State::default(),
            StateStore::new(dir.path()),
            Box::new(MemDataplane::default()),
            status,
        )
        .unwrap();
        let shared = Shared::new(core);
        T {
            app: router(shared.clone()),
            shared,
            _dir: dir,
        }
    }

    async fn call(t: &T, method: &str, uri: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(body.map(|b| Body::from(b.to_string())).unwrap_or_default())
            .unwrap();
        let resp = t.app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{uri}: not json ({e}): {bytes:?}"))
        };
        (status, v)
    }

    const AMQP: &str = r#"{"name":"amqp","vip":"10.0.0.10:5672","proto":"tcp","ring_size":13}"#;

    #[tokio::test]
    async fn service_lifecycle() {
        let t = app();
        let (st, v) = call(&t, "POST", "/v1/services", Some(AMQP)).await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(v["id"], 1);
        assert_eq!(v["vip"], "10.0.0.10:5672");
        assert_eq!(v["hash"], "five-tuple");
        assert_eq!(v["udp_idle_s"], 60);
        let (st, v) = call(&t, "GET", "/v1/services", None).await;
        assert_eq!(st, 200);
        assert_eq!(v.as_array().unwrap().len(), 1);
        let (st, v) = call(&t, "GET", "/v1/services/amqp", None).await;
        assert_eq!((st, &v["name"]), (200, &serde_json::json!("amqp")));
        let (st, _) = call(&t, "DELETE", "/v1/services/amqp", None).await;
        assert_eq!(st, 200);
        let (st, v) = call(&t, "GET", "/v1/services/amqp", None).await;
        assert_eq!(st, 404);
        assert_eq!(v["error"], "unknown service amqp");
    }

    #[tokio::test]
    async fn errors_are_json_with_4xx() {
        let t = app();
        call(&t, "POST", "/v1/services", Some(AMQP)).await;
        let (st, v) = call(&t, "POST", "/v1/services", Some(AMQP)).await;
        assert_eq!(
            (st, v["error"].as_str().unwrap()),
            (409, "service amqp already exists")
        );
        let dup_vip = r#"{"name":"b","vip":"10.0.0.10:5672","proto":"tcp"}"#;
        let (st, v) = call(&t, "POST", "/v1/services", Some(dup_vip)).await;
        assert_eq!(st, 409);
        assert_eq!(
            v["error"],
            "10.0.0.10:5672/tcp is already used by service amqp"
        );
        let bad = r#"{"name":"c","vip":"nope","proto":"tcp"}"#;
        let (st, v) = call(&t, "POST", "/v1/services", Some(bad)).await;
        assert_eq!(st, 400);
        assert!(
            v["error"].as_str().unwrap().starts_with("bad address"),
            "{v}"
        );
        let (st, v) = call(&t, "POST", "/v1/services", Some("{")).await;
        assert_eq!(st, 400);
        assert!(
            v["error"].as_str().unwrap().starts_with("bad request body"),
            "{v}"
        );
        let bad_proto = r#"{"name":"c","vip":"10.0.0.1:1","proto":"sctp"}"#;
        let (st, _) = call(&t, "POST", "/v1/services", Some(bad_proto)).await;
        assert_eq!(st, 422);
        let typo = r#"{"addr":"10.0.1.1","weigth":5}"#;
        let (st, v) = call(&t, "POST", "/v1/services/amqp/backends", Some(typo)).await;
        assert_eq!(st, 422);
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("unknown field `weigth`"),
            "{v}"
        );
        let (st, v) = call(&t, "GET", "/v2/nothing", None).await;
        assert_eq!(st, 404);
        assert!(v["error"].as_str().unwrap().contains("no such endpoint"));
        let (st, v) = call(
            &t,
            "POST",
            "/v1/services/nope/backends",
            Some(r#"{"addr":"10.0.1.1"}"#),
        )
        .await;
        assert_eq!(
            (st, v["error"].as_str().unwrap()),
            (404, "unknown service nope")
        );
    }

    #[tokio::test]
    async fn backend_lifecycle() {
        let t = app();
        call(&t, "POST", "/v1/services", Some(AMQP)).await;
        let (st, v) = call(
            &t,
            "POST",
            "/v1/services/amqp/backends",
            Some(r#"{"addr":"10.0.1.1"}"#),
        )
        .await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(
            (v["id"].as_u64(), v["weight"].as_u64()),
            (Some(1), Some(100))
        );
        assert_eq!(v["state"], "active");
        let (st, v) = call(
            &t,
            "POST",
            "/v1/services/amqp/backends",
            Some(r#"{"addr":"10.0.1.2","weight":70000}"#),
        )
        .await;
        assert_eq!(
            (st, v["error"].as_str().unwrap()),
            (400, "weight 70000 is out of range (1-65535)")
        );
        let (st, v) = call(
            &t,
            "POST",
            "/v1/services/amqp/backends",
            Some(r#"{"addr":"10.0.1.1"}"#),
        )
        .await;
        assert_eq!(st, 409);
        assert_eq!(
            v["error"],
            "backend 10.0.1.1 already exists in service amqp"
        );

        let (st, v) = call(
            &t,
            "PATCH",
            "/v1/services/amqp/backends/10.0.1.1",
            Some(r#"{"state":"draining"}"#),
        )
        .await;
        assert_eq!((st, v["state"].as_str().unwrap()), (200, "draining"));
        let (st, v) = call(
            &t,
            "PATCH",
            "/v1/services/amqp/backends/10.0.1.1",
            Some(r#"{"weight":5}"#),
        )
        .await;
        assert_eq!((st, v["weight"].as_u64().unwrap()), (200, 5));
        let (st, v) = call(&t, "GET", "/v1/services/amqp/backends", None).await;
        assert_eq!(st, 200);
        assert_eq!(v[0]["addr"], "10.0.1.1");
        assert_eq!(v[0]["state"], "draining");
        let (st, _) = call(&t, "DELETE", "/v1/services/amqp/backends/10.0.1.1", None).await;
        assert_eq!(st, 200);
        let (st, v) = call(&t, "DELETE", "/v1/services/amqp/backends/10.0.1.1", None).await;
        assert_eq!(st, 404);
        assert_eq!(v["error"], "backend 10.0.1.1 not found in service amqp");
        assert_eq!(t.shared.core.lock().await.state().removed.len(), 1);
    }

    #[tokio::test]
    async fn stats_name_every_counter() {
        let t = app();
        call(&t, "POST", "/v1/services", Some(AMQP)).await;
        call(
            &t,
            "POST",
            "/v1/services/amqp/backends",
            Some(r#"{"addr":"10.0.1.1","weight":3}"#),
        )
        .await;
        let (st, v) = call(&t, "GET", "/v1/stats", None).await;
        assert_eq!(st, 200, "{v}");
        for c in lb_common::Counter::ALL {
            assert_eq!(v["counters"][c.name()], 0, "{}", c.name());
        }
        for d in lb_common::DropReason::ALL {
            assert_eq!(v["drops"][d.name()], 0, "{}", d.name());
        }
        let svc = &v["services"][0];
        assert_eq!(svc["name"], "amqp");
        assert_eq!(svc["backends"][0]["weight"], 3);
        assert_eq!(svc["backends"][0]["state"], "active");
        let parsed: StatsView = serde_json::from_value(v).unwrap();
        assert_eq!(parsed.services[0].backends[0].packets, 0);
    }

    #[tokio::test]
    async fn health_settings_through_the_api_never_show_the_password() {
        let t = app();
        let body = r#"{"name":"mgmt","vip":"10.0.0.10:15672","proto":"tcp","ring_size":13,
            "health":{"check":"http:http://{backend}:15672/api/health/checks/alarms",
                      "user":"guest","password":"s3cret","interval_ms":5000}}"#;
        let (st, v) = call(&t, "POST", "/v1/services", Some(body)).await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(v["health"]["password"], "***");
        assert_eq!(v["health"]["user"], "guest");
        assert_eq!(v["health"]["interval_ms"], 5000);
        assert_eq!(v["health"]["rise"], 2);
        assert_eq!(v["panic"], false);
        for uri in ["/v1/services", "/v1/services/mgmt"] {
            let (_, v) = call(&t, "GET", uri, None).await;
            assert!(!v.to_string().contains("s3cret"), "{uri}: {v}");
        }
        // Saved with the password, readable by root only.
        let path = t._dir.path().join("state.json");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("s3cret"));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let (st, v) = call(
            &t,
            "PATCH",
            "/v1/services/mgmt",
            Some(r#"{"health":{"rise":5,"panic_threshold":25,"on_down":"keep"}}"#),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            (
                v["health"]["rise"].as_u64(),
                v["health"]["panic_threshold"].as_u64(),
                v["health"]["on_down"].as_str()
            ),
            (Some(5), Some(25), Some("keep"))
        );
        assert_eq!(v["health"]["password"], "***");
        let (st, v) = call(
            &t,
            "PATCH",
            "/v1/services/mgmt",
            Some(r#"{"health":{"timeout_ms":6000}}"#),
        )
        .await;
        assert_eq!(st, 400);
        assert_eq!(
            v["error"],
            "check interval (5s) must be longer than the check timeout (6s)"
        );
        let (st, v) = call(
            &t,
            "PATCH",
            "/v1/services/mgmt",
            Some(r#"{"health":{"check":"icmp"}}"#),
        )
        .await;
        assert_eq!(st, 422, "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("unknown check"),
            "{v}"
        );
        let (st, _) = call(
            &t,
            "PATCH",
            "/v1/services/nope",
            Some(r#"{"health":{"rise":1}}"#),
        )
        .await;
        assert_eq!(st, 404);

        call(
            &t,
            "POST",
            "/v1/services/mgmt/backends",
            Some(r#"{"addr":"10.0.1.1"}"#),
        )
        .await;
        let (st, v) = call(&t, "GET", "/v1/services/mgmt/backends", None).await;
        assert_eq!(st, 200);
        assert_eq!(v[0]["addr"], "10.0.1.1");
        assert_eq!(v[0]["in_table"], true);
        assert_eq!(v[0]["health"]["status"], "up");
        assert_eq!(v[0]["health"]["checked"], false);
        assert_eq!(v[0]["health"]["transitions"]["down"], 0);
        let (_, v) = call(&t, "GET", "/v1/stats", None).await;
        assert_eq!(v["services"][0]["panic"], false);
        assert_eq!(v["services"][0]["backends"][0]["health"]["status"], "up");
        let (_, v) = call(&t, "DELETE", "/v1/services/mgmt", None).await;
        assert_eq!(v["health"]["password"], "***");
    }

    #[tokio::test]
    async fn shutdown_checks_the_interface() {
        let t = app();
        let (st, v) = call(&t, "POST", "/v1/shutdown", Some(r#"{"iface":"eth0"}"#)).await;
        assert_eq!(st, 409);
        assert!(v["error"]
            .as_str()
            .unwrap()
            .contains("serves eth9, not eth0"));
        assert!(!*t.shared.shutdown.borrow());
        let (st, v) = call(&t, "POST", "/v1/shutdown", Some(r#"{"iface":"eth9"}"#)).await;
        assert_eq!((st, v["pid"].as_u64()), (200, Some(42)));
        assert!(*t.shared.shutdown.borrow());
    }

    #[tokio::test]
    async fn concurrent_adds_get_distinct_ids() {
        let t = app();
        call(&t, "POST", "/v1/services", Some(AMQP)).await;
        let mut tasks = Vec::new();
        for i in 1..=20 {
            let app = t.app.clone();
            tasks.push(tokio::spawn(async move {
                let body = format!(r#"{{"addr":"10.0.1.{i}"}}"#);
                let req = axum::http::Request::builder()
                    .method("POST")
                    .uri("/v1/services/amqp/backends")
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .unwrap();
                app.oneshot(req).await.unwrap().status().as_u16()
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), 201);
        }
        let core = t.shared.core.lock().await;
        let mut ids: Vec<u32> = core.state().services[0]
            .backends
            .iter()
            .map(|b| b.id)
            .collect();
        ids.sort();
        assert_eq!(ids, (1..=20).collect::<Vec<_>>());
    }

    /// `POST /v1/apply` with this `desired` (JSON).
    async fn apply(t: &T, desired: serde_json::Value, dry_run: bool) -> (u16, serde_json::Value) {
        let body = serde_json::json!({ "dry_run": dry_run, "desired": desired });
        call(t, "POST", "/v1/apply", Some(&body.to_string())).await
    }

    fn lines(reply: &serde_json::Value) -> Vec<String> {
        let reply: ApplyReply = serde_json::from_value(reply.clone()).unwrap();
        reply.changes.iter().map(ToString::to_string).collect()
    }

    #[tokio::test]
    async fn apply_sets_everything_in_one_request_and_export_reads_it_back() {
        let t = app();
        let desired = serde_json::json!({
            "seed": 9,
            "service": [{
                "name": "amqp", "vip": "10.0.0.10:5672", "proto": "tcp", "ring_size": 13,
                "check": "amqp",
                "backends": [{"ip": "10.0.1.1"}, {"ip": "10.0.1.2", "weight": 300}]
            }, {
                "name": "mgmt", "vip": "10.0.0.10:15672", "proto": "tcp", "ring_size": 13,
                "check": "http:http://{backend}:15672/api/health/checks/alarms",
                "check_user": "guest", "check_password": "s3cret"
            }]
        });
        let (st, v) = apply(&t, desired.clone(), true).await;
        assert_eq!((st, &v["applied"]), (200, &false.into()), "{v}");
        assert_eq!(lines(&v).len(), 5, "{v}");
        assert!(
            t.shared.core.lock().await.state().services.is_empty(),
            "a dry run changes nothing"
        );
        assert!(!t._dir.path().join("state.json").exists(), "nor saves");

        let (st, v) = apply(&t, desired.clone(), false).await;
        assert_eq!((st, &v["applied"]), (200, &true.into()), "{v}");
        assert_eq!(
            lines(&v),
            [
                "~ seed 0 -> 9",
                "+ service amqp 10.0.0.10:5672/tcp",
                "+ backend amqp 10.0.1.1 weight 100",
                "+ backend amqp 10.0.1.2 weight 300",
                "+ service mgmt 10.0.0.10:15672/tcp",
            ]
        );
        let saved = StateStore::new(t._dir.path()).load().unwrap().unwrap();
        assert_eq!(saved.seed, 9);
        assert_eq!(saved.services[0].backends[1].weight, 300);

        let (st, exported) = call(&t, "GET", "/v1/export", None).await;
        assert_eq!(st, 200);
        assert_eq!(exported["service"][1]["check_password"], "***");
        assert!(!exported.to_string().contains("s3cret"));
        // Applying the export changes nothing (the placeholder keeps the password).
        let (st, v) = apply(&t, exported.clone(), false).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(lines(&v), Vec::<String>::new());
        let saved = StateStore::new(t._dir.path()).load().unwrap().unwrap();
        assert_eq!(saved.services[1].health.password.as_deref(), Some("s3cret"));
    }

    #[tokio::test]
    async fn a_refused_apply_changes_nothing_and_says_where() {
        let t = app();
        call(&t, "POST", "/v1/services", Some(AMQP)).await;
        call(
            &t,
            "POST",
            "/v1/services/amqp/backends",
            Some(r#"{"addr":"10.0.1.1"}"#),
        )
        .await;
        let before = t.shared.core.lock().await.state().clone();
        let file_before = std::fs::read(t._dir.path().join("state.json")).unwrap();
        // The first service is fine, the second's backend is not.
        let desired = serde_json::json!({
            "seed": 4,
            "service": [
                {"name": "amqp", "vip": "10.0.0.10:5672", "proto": "tcp", "ring_size": 13,
                 "backends": [{"ip": "10.0.1.2"}]},
                {"name": "b", "vip": "10.0.0.11:1", "proto": "tcp", "ring_size": 13,
                 "backends": [{"ip": "10.0.1.1"}, {"ip": "10.0.1.2", "weight": 0}]}
            ]
        });
        let (st, v) = apply(&t, desired, false).await;
        assert_eq!(st, 400, "{v}");
        assert_eq!(
            v["error"],
            "field weight (service b, backend 10.0.1.2): weight 0 is out of range (1-65535)"
        );
        assert_eq!(
            v["at"],
            serde_json::json!({"service": 1, "backend": 1, "field": "weight"})
        );
        assert_eq!(*t.shared.core.lock().await.state(), before);
        assert_eq!(
            std::fs::read(t._dir.path().join("state.json")).unwrap(),
            file_before,
            "nothing saved"
        );
        // A body that is not a desired state is refused by its shape.
        let (st, v) = call(
            &t,
            "POST",
            "/v1/apply",
            Some(r#"{"desired":{"sevrice":[]}}"#),
        )
        .await;
        assert_eq!(st, 422, "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("unknown field `sevrice`"),
            "{v}"
        );
        assert_eq!(v.get("at"), None);
    }

    #[tokio::test]
    async fn apply_deletes_backends_the_way_backend_del_does() {
        use std::sync::{Arc as StdArc, Mutex as StdMutex};
        let dir = tempfile::tempdir().unwrap();
        let dp = StdArc::new(StdMutex::new(MemDataplane::default()));
        let core = Core::new(
            State::default(),
            StateStore::new(dir.path()),
            Box::new(dp.clone()),
            StatusView::default(),
        )
        .unwrap();
        let shared = Shared::new(core);
        let t = T {
            app: router(shared.clone()),
            shared,
            _dir: dir,
        };
        let three = |weight: u32| {
            serde_json::json!({"service": [{
                "name": "amqp", "vip": "10.0.0.10:5672", "proto": "tcp", "ring_size": 13,
                "backends": [{"ip": "10.0.1.1"}, {"ip": "10.0.1.2", "weight": weight},
                             {"ip": "10.0.1.3"}]
            }]})
        };
        let (st, _) = apply(&t, three(100), false).await;
        assert_eq!(st, 200);
        let ring = |dp: &StdMutex<MemDataplane>| {
            let mem = dp.lock().unwrap();
            let v = mem.services.values().next().copied().unwrap();
            (v.ring_base..v.ring_base + v.ring_size)
                .map(|i| mem.rings[&i])
                .collect::<Vec<u32>>()
        };
        let ids: BTreeSet<u32> = ring(&dp).into_iter().collect();
        assert_eq!(ids, [1, 2, 3].into());

        let mut two = three(200);
        two["service"][0]["backends"]
            .as_array_mut()
            .unwrap()
            .remove(2);
        let (st, v) = apply(&t, two, false).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            lines(&v),
            [
                "- backend amqp 10.0.1.3",
                "~ backend amqp 10.0.1.2 weight 100 -> 200"
            ]
        );
        // Out of the table, but its id and entry stay (REMOVED) so its
        // established flows finish, as after `mqlb backend del`.
        let ring = ring(&dp);
        assert!(!ring.contains(&3));
        let count = |id| ring.iter().filter(|&&b| b == id).count();
        assert!(count(2) > count(1), "weight 200 takes more slots: {ring:?}");
        assert_eq!(
            dp.lock().unwrap().backends[&3].state,
            lb_common::backend_state::REMOVED
        );
        assert_eq!(t.shared.core.lock().await.state().removed[0].id, 3);
    }

    #[test]
    fn query_params_are_decoded() {
        assert_eq!(
            query_param("client=10.0.0.2%3A40000", "client").as_deref(),
            Some("10.0.0.2:40000")
        );
        assert_eq!(
            query_param("x=1&client=10.0.0.2:1", "client").as_deref(),
            Some("10.0.0.2:1")
        );
        assert_eq!(query_param("clients=1", "client"), None);
        assert_eq!(
            query_param("client=%zz%4", "client").as_deref(),
            Some("%zz%4")
        );
    }

    #[tokio::test]
    async fn flow_asks_the_program_and_leaves_conntrack_as_it_was() {
        use std::sync::{Arc as StdArc, Mutex as StdMutex};
        let dir = tempfile::tempdir().unwrap();
        let dp = StdArc::new(StdMutex::new(MemDataplane {
            outer_src: [10, 0, 0, 1],
            ..Default::default()
        }));
        let core = Core::new(
            State::default(),
            StateStore::new(dir.path()),
            Box::new(dp.clone()),
            StatusView::default(),
        )
        .unwrap();
        let shared = Shared::new(core);
        let t = T {
            app: router(shared.clone()),
            shared,
            _dir: dir,
        };
        call(&t, "POST", "/v1/services", Some(AMQP)).await;
        let uri = "/v1/services/amqp/flow?client=10.0.0.2:40000";
        let (st, v) = call(&t, "GET", uri, None).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            (&v["reason"], &v["verdict"]),
            (&"no_backend".into(), &"drop".into())
        );
        assert_eq!(v["backend"], serde_json::Value::Null);

        for addr in ["10.0.1.1", "10.0.1.2"] {
            let body = format!(r#"{{"addr":"{addr}"}}"#);
            let (st, _) = call(&t, "POST", "/v1/services/amqp/backends", Some(&body)).await;
            assert_eq!(st, 201);
        }
        let (st, v) = call(&t, "GET", uri, None).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["reason"], "table");
        assert_eq!(v["verdict"], "redirect");
        assert_eq!(v["client"], "10.0.0.2:40000");
        assert_eq!(v["vip"], "10.0.0.10:5672");
        let picked = v["backend"].as_str().unwrap().to_string();
        let id = v["backend_id"].as_u64().unwrap() as u32;
        assert_eq!(picked, format!("10.0.1.{id}"));
        assert!(
            dp.lock().unwrap().ct.is_empty(),
            "the probe's entry is removed"
        );

        // A conntrack entry pinning the flow to the other backend wins.
        let other = 3 - id;
        let flow = crate::probe::flow4(
            "10.0.0.2:40000".parse().unwrap(),
            "10.0.0.10:5672".parse().unwrap(),
            crate::state::Proto::Tcp,
        );
        let entry = lb_common::CtEntry {
            backend: other,
            ..Default::default()
        };
        dp.lock().unwrap().ct.insert(flow, entry);
        let (st, v) = call(
            &t,
            "GET",
            "/v1/services/amqp/flow?client=10.0.0.2%3A40000",
            None,
        )
        .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["reason"], "conntrack");
        assert_eq!(v["backend"], format!("10.0.1.{other}"));
        assert_eq!(v["backend_id"], other);
        assert_eq!(dp.lock().unwrap().ct.get(&flow), Some(&entry));

        let (st, v) = call(&t, "GET", "/v1/services/nope/flow?client=10.0.0.2:1", None).await;
        assert_eq!(
            (st, v["error"].as_str().unwrap()),
            (404, "unknown service nope")
        );
        let (st, v) = call(&t, "GET", "/v1/services/amqp/flow?client=10.0.0.2", None).await;
        assert_eq!(st, 400);
        assert!(
            v["error"].as_str().unwrap().starts_with("bad address"),
            "{v}"
        );
        let (st, v) = call(&t, "GET", "/v1/services/amqp/flow", None).await;
        assert_eq!(st, 400);
        assert_eq!(v["error"], "missing query parameter client=IP:PORT");

        // The destination port: the service's own, or refused.
        let (st, v) = call(&t, "GET", &format!("{uri}&port=5672"), None).await;
        assert_eq!((st, &v["vip"]), (200, &"10.0.0.10:5672".into()), "{v}");
        for (port, error) in [
            ("0", "bad port \"0\": expected a number from 1 to 65535"),
            ("x", "bad port \"x\": expected a number from 1 to 65535"),
            (
                "5673",
                "port 5673 is not a port of service amqp (10.0.0.10:5672)",
            ),
        ] {
            let (st, v) = call(&t, "GET", &format!("{uri}&port={port}"), None).await;
            assert_eq!((st, v["error"].as_str().unwrap()), (400, error));
        }
    }
}
