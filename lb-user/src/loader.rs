//! Loading, pinning and attaching the XDP programs.
//!
//! Pins of interface IF live under `/sys/fs/bpf/mqlb/IF/`:
//! - `v{LAYOUT_VERSION}/<MAP>`: every map of `mqlb`, so a restarted daemon
//!   (even after `kill -9`) re-opens the same maps and conntrack survives;
//! - `link`: the XDP link of `mqlb`. A new daemon replaces the program on
//!   that link atomically (`bpf_link_update`) instead of detaching it, so no
//!   packet misses a program;
//! - `decap/link` and `decap/v{LAYOUT_VERSION}/<MAP>`: the `mqlb decap` program.
//!
//! A pinned map whose layout (key size, value size, entries) differs from
//! what this build's object declares is refused before anything is loaded.

use std::{
    fmt, fs, io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, MapInfo},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        ProgramError, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{names, LAYOUT_VERSION};
use serde::{Deserialize, Serialize};

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How to attach XDP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Native (driver) mode, falling back to skb (generic) mode.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic mode in the kernel's network stack (works on any interface).
    Skb,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Native => "native",
            Mode::Skb => "skb",
        })
    }
}

/// How the program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attached {
    /// A new link in native mode.
    Native,
    /// A new link in skb (generic) mode.
    Skb,
    /// The program was swapped into the existing pinned link (its mode kept).
    Replaced,
}

impl fmt::Display for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Attached::Native => "attached in native mode",
            Attached::Skb => "attached in skb (generic) mode",
            Attached::Replaced => "swapped into the existing pinned link (mode kept)",
        })
    }
}

/// Errors loading or attaching, each with what to do next.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{what} needs root (CAP_BPF, CAP_NET_ADMIN)")]
    NoPrivilege { what: &'static str },
    #[error("interface {iface} not found")]
    NoInterface { iface: String },
    #[error("cannot mount bpffs at {BPFFS}")]
    BpfFs {
        #[source]
        source: nix::Error,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pinned map {path} has {found} but this mqlb needs {want}; it was left by another \
         build: run `mqlb down --iface {iface}` (drops conntrack) and start again"
    )]
    LayoutMismatch {
        path: PathBuf,
        iface: String,
        found: Layout,
        want: Layout,
    },
    #[error(
        "{iface} has maps of layout v{found} pinned under {root} (another mqlb version) but \
         this mqlb uses v{want}; they cannot be carried over: run `mqlb down --iface {iface}` \
         (detaches, drops conntrack) and start again, or run the matching mqlb"
    )]
    OtherLayout {
        iface: String,
        root: PathBuf,
        found: u32,
        want: u32,
    },
    #[error(
        "pinned {map} holds {pinned} entries but --ct-entries asks for {asked}; drop \
         --ct-entries to keep {pinned}, or run `mqlb down --iface {iface}` first (drops conntrack)"
    )]
    CtEntriesMismatch {
        iface: String,
        map: String,
        pinned: u32,
        asked: u32,
    },
    #[error("cannot read pinned map {path}")]
    PinnedMap {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the embedded eBPF object is unreadable: {0}")]
    Object(String),
    #[error("loading the XDP program failed")]
    Load {
        #[source]
        source: aya::EbpfError,
    },
    #[error("loading the XDP program failed")]
    Program {
        #[source]
        source: ProgramError,
    },
    #[error("XDP native mode failed on {iface}; try --mode skb ({reason})")]
    NativeUnsupported { iface: String, reason: String },
    #[error(
        "{iface} already has an XDP program that is not on mqlb's pinned link; remove it \
         first (ip link set dev {iface} xdp off)"
    )]
    Busy { iface: String },
    #[error("attaching XDP to {iface} failed")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("this kernel has no bpf_link for XDP on {iface}; mqlb needs one (Linux 5.9+)")]
    NoBpfLink { iface: String },
    #[error("cannot pin the XDP link at {path}")]
    PinLink {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot open the pinned link {path}")]
    OpenLink {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("cannot fill {map}")]
    Fill {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("mqlb is not attached to {iface} (no pins under {path})")]
    NotAttached { iface: String, path: PathBuf },
}

/// Key size, value size and entries of a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key {} B / value {} B / {} entries",
            self.key_size, self.value_size, self.max_entries
        )
    }
}

/// Pin locations of one interface.
#[derive(Clone, Debug)]
pub struct Pins {
    pub iface: String,
    pub root: PathBuf,
}

impl Pins {
    pub fn new(iface: &str) -> Self {
        Pins {
            iface: iface.into(),
            root: Path::new(BPFFS).join("mqlb").join(iface),
        }
    }

    /// Directory of the `mqlb` maps of this layout version.
    pub fn maps(&self) -> PathBuf {
        self.root.join(format!("v{LAYOUT_VERSION}"))
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn link(&self) -> PathBuf {
        self.root.join("link")
    }

    pub fn decap(&self) -> PathBuf {
        self.root.join("decap")
    }

    pub fn decap_maps(&self) -> PathBuf {
        self.decap().join(format!("v{LAYOUT_VERSION}"))
    }

    pub fn decap_link(&self) -> PathBuf {
        self.decap().join("link")
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LoadError {
    let path = path.to_path_buf();
    move |source| LoadError::Io {
        action,
        path,
        source,
    }
}

/// Refuses early, with the message a person needs, when not root.
pub fn require_root(what: &'static str) -> Result<(), LoadError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(LoadError::NoPrivilege { what })
    }
}

/// The interface's index, or "interface X not found".
pub fn ifindex(iface: &str) -> Result<u32, LoadError> {
    nix::net::if_::if_nametoindex(iface).map_err(|_| LoadError::NoInterface {
        iface: iface.into(),
    })
}

/// Mounts bpffs at `/sys/fs/bpf` unless it is there. Returns whether it mounted.
pub fn ensure_bpffs() -> Result<bool, LoadError> {
    if let Ok(st) = nix::sys::statfs::statfs(BPFFS) {
        // The field's integer type differs between architectures.
        #[allow(clippy::unnecessary_cast)]
        if st.filesystem_type().0 as i64 == BPF_FS_MAGIC {
            return Ok(false);
        }
    }
    fs::create_dir_all(BPFFS).map_err(io_err("create", Path::new(BPFFS)))?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| LoadError::BpfFs { source })?;
    Ok(true)
}

fn mkdir_private(path: &Path) -> Result<(), LoadError> {
    fs::create_dir_all(path).map_err(io_err("create", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err("chmod", path))
}

/// The maps of an object that get pinned (data sections are not) and their layouts.
fn object_maps(object: &[u8]) -> Result<Vec<(String, Layout)>, LoadError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| LoadError::Object(e.to_string()))?;
    let mut maps: Vec<(String, Layout)> = obj
        .maps
        .iter()
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(name, m)| {
            (
                name.clone(),
                Layout {
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries: m.max_entries(),
                },
            )
        })
        .collect();
    maps.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(maps)
}

fn pinned_layout(path: &Path) -> Result<Option<Layout>, LoadError> {
    if !path.exists() {
        return Ok(None);
    }
    let info = MapInfo::from_pin(path).map_err(|source| LoadError::PinnedMap {
        path: path.into(),
        source,
    })?;
    Ok(Some(Layout {
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    }))
}

/// Whether `name` is a conntrack map (`CT4`, `CT6`): sized by `--ct-entries`,
/// per address family.
fn is_conntrack(name: &str) -> bool {
    name == names::CT4 || name == names::CT6
}

/// Decides the conntrack sizes and checks every pinned map against the object.
/// `ct_entries: None` keeps a pinned conntrack map's size (default for a new one).
fn check_pinned(
    pins: &Pins,
    maps_dir: &Path,
    maps: &mut [(String, Layout)],
    ct_entries: Option<u32>,
) -> Result<(), LoadError> {
    for (name, want) in maps.iter_mut() {
        let path = maps_dir.join(&*name);
        let found = pinned_layout(&path)?;
        if is_conntrack(name) {
            match (found, ct_entries) {
                (Some(f), Some(asked)) if f.max_entries != asked => {
                    return Err(LoadError::CtEntriesMismatch {
                        iface: pins.iface.clone(),
                        map: name.clone(),
                        pinned: f.max_entries,
                        asked,
                    })
                }
                (Some(f), _) => want.max_entries = f.max_entries,
                (None, Some(asked)) => want.max_entries = asked,
                (None, None) => {}
            }
        }
        if let Some(found) = found {
            if found != *want {
                return Err(LoadError::LayoutMismatch {
                    path,
                    iface: pins.iface.clone(),
                    found,
                    want: *want,
                });
            }
        }
    }
    Ok(())
}

fn load_object(
    object: &[u8],
    maps_dir: &Path,
    maps: &[(String, Layout)],
) -> Result<Ebpf, LoadError> {
    let mut loader = EbpfLoader::new();
    for (name, layout) in maps {
        loader.map_pin_path(name.as_str(), maps_dir.join(name));
        loader.map_max_entries(name.as_str(), layout.max_entries);
    }
    loader.load(object).map_err(|source| match source {
        aya::EbpfError::MapError(aya::maps::MapError::CreateError { ref io_error, .. })
            if io_error.kind() == io::ErrorKind::PermissionDenied =>
        {
            LoadError::NoPrivilege {
                what: "loading XDP",
            }
        }
        source => LoadError::Load { source },
    })
}

fn errno(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

/// Loads the program named `name` and puts it on `iface`: into the pinned
/// link if there is one, else on a new link (pinned at `link_pin`).
fn attach(
    ebpf: &mut Ebpf,
    name: &str,
    iface: &str,
    mode: Mode,
    link_pin: &Path,
) -> Result<(Attached, u32), LoadError> {
    let ifindex = ifindex(iface)?;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| LoadError::Object(format!("no program {name}")))?
        .try_into()
        .map_err(|source| LoadError::Program { source })?;
    prog.load()
        .map_err(|source| LoadError::Program { source })?;
    let prog_id = prog
        .info()
        .map(|i| i.id())
        .map_err(|source| LoadError::Program { source })?;

    if link_pin.exists() {
        let pinned = PinnedLink::from_pin(link_pin).map_err(|source| LoadError::OpenLink {
            path: link_pin.into(),
            source,
        })?;
        let fd_link: FdLink = pinned.into();
        let link = XdpLink::try_from(fd_link).map_err(|source| LoadError::OpenLink {
            path: link_pin.into(),
            source,
        })?;
        match prog.attach_to_link(link) {
            Ok(id) => {
                // The pin keeps the link; dropping our handle only closes a fd.
                drop(prog.take_link(id));
                return Ok((Attached::Replaced, prog_id));
            }
            // The link outlived its interface (deleted and re-created):
            // it is defunct, so start a new one.
            Err(e) if errno(&e) == Some(nix::libc::ENOLINK) => {
                tracing::warn!(
                    path = %link_pin.display(),
                    "pinned link is defunct (interface re-created); attaching a new one"
                );
                fs::remove_file(link_pin).map_err(io_err("remove", link_pin))?;
            }
            Err(source) => {
                return Err(LoadError::Attach {
                    iface: iface.into(),
                    source,
                })
            }
        }
    }

    let tries: &[XdpMode] = match mode {
        Mode::Auto => &[XdpMode::Driver, XdpMode::Skb],
        Mode::Native => &[XdpMode::Driver],
        Mode::Skb => &[XdpMode::Skb],
    };
    let mut last = None;
    for &xdp_mode in tries {
        match prog.attach_to_if_index(ifindex, xdp_mode) {
            Ok(id) => {
                let link = prog
                    .take_link(id)
                    .map_err(|source| LoadError::Program { source })?;
                let fd_link = FdLink::try_from(link).map_err(|_| LoadError::NoBpfLink {
                    iface: iface.into(),
                })?;
                if let Some(dir) = link_pin.parent() {
                    mkdir_private(dir)?;
                }
                let pinned = fd_link.pin(link_pin).map_err(|source| LoadError::PinLink {
                    path: link_pin.into(),
                    source,
                })?;
                drop(pinned);
                let how = if xdp_mode == XdpMode::Driver {
                    Attached::Native
                } else {
                    Attached::Skb
                };
                return Ok((how, prog_id));
            }
            Err(e) => {
                match errno(&e) {
                    Some(nix::libc::EBUSY) | Some(nix::libc::EEXIST) => {
                        return Err(LoadError::Busy {
                            iface: iface.into(),
                        })
                    }
                    Some(nix::libc::EPERM) => {
                        return Err(LoadError::NoPrivilege {
                            what: "attaching XDP",
                        })
                    }
                    _ => {}
                }
                if xdp_mode == XdpMode::Driver && mode == Mode::Auto {
                    tracing::warn!(
                        iface,
                        error = %crate::daemon::error_chain(&e),
                        "XDP native mode failed; falling back to skb (generic) mode"
                    );
                }
                last = Some((xdp_mode, e));
            }
        }
    }
    match last {
        Some((XdpMode::Driver, source)) => Err(LoadError::NativeUnsupported {
            iface: iface.into(),
            reason: crate::daemon::error_chain(&source),
        }),
        Some((_, source)) => Err(LoadError::Attach {
            iface: iface.into(),
            source,
        }),
        None => unreachable!("at least one mode is tried"),
    }
}

/// What [`load_lb`] did.
pub struct LoadedLb {
    pub ebpf: Ebpf,
    pub attached: Attached,
    pub prog_id: u32,
    pub ct_entries: u32,
    pub pins: Pins,
}

/// Loads `mqlb` with every map pinned (re-opening existing pins) and puts it
/// on `iface`. `ct_entries: None` keeps a pinned conntrack's size.
pub fn load_lb(
    object: &[u8],
    program: &str,
    iface: &str,
    mode: Mode,
    ct_entries: Option<u32>,
) -> Result<LoadedLb, LoadError> {
    let pins = Pins::new(iface);
    let mut maps = object_maps(object)?;
    if ct_entries.is_none() {
        // Default for a new conntrack map.
        for (_, l) in maps.iter_mut().filter(|(n, _)| is_conntrack(n)) {
            l.max_entries = lb_common::CT_DEFAULT_ENTRIES;
        }
    }
    if let Some(&found) = other_layouts(&pins.root).first() {
        return Err(LoadError::OtherLayout {
            iface: iface.into(),
            root: pins.root,
            found,
            want: LAYOUT_VERSION,
        });
    }
    let maps_dir = pins.maps();
    check_pinned(&pins, &maps_dir, &mut maps, ct_entries)?;
    mkdir_private(&maps_dir)?;
    let ct = maps
        .iter()
        .find(|(n, _)| n == names::CT4)
        .map(|(_, l)| l.max_entries)
        .unwrap_or(0);
    let existed: Vec<bool> = maps
        .iter()
        .map(|(n, _)| maps_dir.join(n).exists())
        .collect();
    let result = load_object(object, &maps_dir, &maps).and_then(|mut ebpf| {
        attach(&mut ebpf, program, iface, mode, &pins.link()).map(|a| (ebpf, a))
    });
    let (ebpf, (attached, prog_id)) = match result {
        Ok(r) => r,
        Err(e) => {
            // Nothing runs on these maps: do not leave pins behind that a
            // failed first start created.
            for ((name, _), existed) in maps.iter().zip(existed) {
                if !existed {
                    let _ = fs::remove_file(maps_dir.join(name));
                }
            }
            remove_dir_if_empty(&maps_dir);
            remove_dir_if_empty(&pins.root);
            return Err(e);
        }
    };
    Ok(LoadedLb {
        ebpf,
        attached,
        prog_id,
        ct_entries: ct,
        pins,
    })
}

/// What [`load_decap`] did.
pub struct LoadedDecap {
    pub attached: Attached,
    pub prog_id: u32,
    pub link: PathBuf,
    pub addrs: Vec<std::net::IpAddr>,
}

/// Loads `mqlb_decap` on `iface` (replacing the program of an existing decap
/// link) and sets the addresses it decapsulates for to exactly `addrs`.
pub fn load_decap(
    object: &[u8],
    program: &str,
    iface: &str,
    mode: Mode,
    addrs: &[std::net::IpAddr],
) -> Result<LoadedDecap, LoadError> {
    let pins = Pins::new(iface);
    let mut maps = object_maps(object)?;
    let maps_dir = pins.decap_maps();
    check_pinned(&pins, &maps_dir, &mut maps, None)?;
    mkdir_private(&maps_dir)?;
    let mut ebpf = load_object(object, &maps_dir, &maps)?;
    let (attached, prog_id) = attach(&mut ebpf, program, iface, mode, &pins.decap_link())?;
    let mut table: HashMap<_, [u8; 16], u32> = ebpf
        .map_mut(names::DECAP_ADDRS)
        .ok_or_else(|| LoadError::Object(format!("no map {}", names::DECAP_ADDRS)))?
        .try_into()
        .map_err(|source| LoadError::Fill {
            map: names::DECAP_ADDRS,
            source,
        })?;
    let want: Vec<[u8; 16]> = addrs.iter().map(|a| crate::plan::addr16(*a)).collect();
    let stale: Vec<[u8; 16]> = table
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains(k))
        .collect();
    for k in &stale {
        table.remove(k).map_err(|source| LoadError::Fill {
            map: names::DECAP_ADDRS,
            source,
        })?;
    }
    for k in &want {
        table.insert(k, 1, 0).map_err(|source| LoadError::Fill {
            map: names::DECAP_ADDRS,
            source,
        })?;
    }
    Ok(LoadedDecap {
        attached,
        prog_id,
        link: pins.decap_link(),
        addrs: addrs.to_vec(),
    })
}

/// Removes a link pin and the map pins in `maps_dir`; returns what it removed.
/// Removing the last reference to a link detaches the program.
fn unpin(link: &Path, maps_dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let mut removed = Vec::new();
    if link.exists() {
        fs::remove_file(link).map_err(io_err("remove", link))?;
        removed.push(link.to_path_buf());
    }
    if maps_dir.exists() {
        let mut entries: Vec<PathBuf> = fs::read_dir(maps_dir)
            .map_err(io_err("read", maps_dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            fs::remove_file(&p).map_err(io_err("remove", &p))?;
            removed.push(p);
        }
        fs::remove_dir(maps_dir).map_err(io_err("remove", maps_dir))?;
    }
    Ok(removed)
}

fn remove_dir_if_empty(dir: &Path) {
    // Other versions' or programs' pins may still live there: keep it then.
    let _ = fs::remove_dir(dir);
}

/// Layout versions other than this build's with maps pinned under `root`
/// (`v{N}` directories), newest first.
fn other_layouts(root: &Path) -> Vec<u32> {
    let mut found: Vec<u32> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.strip_prefix('v')?.parse().ok()?;
            let has_pins = fs::read_dir(e.path()).ok()?.next().is_some();
            (v != LAYOUT_VERSION && has_pins).then_some(v)
        })
        .collect();
    found.sort_unstable_by(|a, b| b.cmp(a));
    found
}

/// Detaches `mqlb` from `iface` and removes its pins (the conntrack goes with
/// them), those of other layout versions too.
pub fn unload_lb(iface: &str) -> Result<Vec<PathBuf>, LoadError> {
    let pins = Pins::new(iface);
    let mut removed = unpin(&pins.link(), &pins.maps())?;
    for v in other_layouts(&pins.root) {
        removed.extend(unpin(Path::new(""), &pins.root.join(format!("v{v}")))?);
    }
    remove_dir_if_empty(&pins.root);
    if removed.is_empty() {
        return Err(LoadError::NotAttached {
            iface: iface.into(),
            path: pins.root,
        });
    }
    Ok(removed)
}

/// Detaches `mqlb decap` from `iface` and removes its pins.
pub fn unload_decap(iface: &str) -> Result<Vec<PathBuf>, LoadError> {
    let pins = Pins::new(iface);
    let removed = unpin(&pins.decap_link(), &pins.decap_maps())?;
    remove_dir_if_empty(&pins.decap());
    remove_dir_if_empty(&pins.root);
    if removed.is_empty() {
        return Err(LoadError::NotAttached {
            iface: iface.into(),
            path: pins.decap(),
        });
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Maps of another layout version are found (so `up` refuses and `down`
    /// removes them); this build's own directory and empty ones are not.
    #[test]
    fn other_layout_versions_are_found() {
        let root = tempfile::tempdir().unwrap();
        let mk = |dir: &str, file: Option<&str>| {
            let d = root.path().join(dir);
            fs::create_dir_all(&d).unwrap();
            if let Some(f) = file {
                fs::write(d.join(f), b"").unwrap();
            }
        };
        assert_eq!(other_layouts(root.path()), Vec::<u32>::new());
        mk(&format!("v{LAYOUT_VERSION}"), Some("CT4"));
        mk("v999", None);
        mk("decap", Some("link"));
        assert_eq!(other_layouts(root.path()), Vec::<u32>::new());
        mk("v1", Some("CT4"));
        mk("v0", Some("SERVICES"));
        assert_eq!(other_layouts(root.path()), [1, 0]);
        let msg = LoadError::OtherLayout {
            iface: "eth1".into(),
            root: root.path().into(),
            found: 1,
            want: LAYOUT_VERSION,
        }
        .to_string();
        assert!(
            msg.contains("layout v1") && msg.contains("mqlb down --iface eth1"),
            "{msg}"
        );
    }

    #[test]
    fn pin_paths_carry_the_layout_version() {
        let p = Pins::new("eth1");
        assert_eq!(p.link(), Path::new("/sys/fs/bpf/mqlb/eth1/link"));
        assert_eq!(
            p.map("CT4"),
            PathBuf::from(format!("/sys/fs/bpf/mqlb/eth1/v{LAYOUT_VERSION}/CT4"))
        );
        assert_eq!(
            p.decap_link(),
            Path::new("/sys/fs/bpf/mqlb/eth1/decap/link")
        );
    }

    #[test]
    fn the_object_declares_the_maps_of_the_contract() {
        let maps = object_maps(crate::programs::LB_OBJECT).unwrap();
        let get = |n: &str| maps.iter().find(|(m, _)| m == n).map(|(_, l)| *l);
        let svc = get(names::SERVICES).unwrap();
        assert_eq!(svc.key_size as usize, size_of::<lb_common::ServiceKey>());
        assert_eq!(
            svc.value_size as usize,
            size_of::<lb_common::ServiceValue>()
        );
        let be = get(names::BACKENDS).unwrap();
        assert_eq!(be.value_size as usize, size_of::<lb_common::Backend>());
        assert_eq!(be.max_entries, lb_common::MAX_BACKENDS);
        for n in [
            names::RINGS,
            names::CT4,
            names::CT6,
            names::STATS,
            names::DROPS,
            names::SVC_STATS,
            names::BE_STATS,
        ] {
            assert!(get(n).is_some(), "{n} missing");
        }
        let decap = object_maps(crate::programs::DECAP_OBJECT).unwrap();
        assert!(decap.iter().any(|(n, _)| n == names::DECAP_ADDRS));
    }

    #[test]
    fn layout_message_tells_what_to_do() {
        let l = Layout {
            key_size: 16,
            value_size: 16,
            max_entries: 10,
        };
        let e = LoadError::LayoutMismatch {
            path: "/sys/fs/bpf/mqlb/eth0/v1/CT4".into(),
            iface: "eth0".into(),
            found: l,
            want: Layout {
                max_entries: 20,
                ..l
            },
        };
        assert_eq!(
            e.to_string(),
            "pinned map /sys/fs/bpf/mqlb/eth0/v1/CT4 has key 16 B / value 16 B / 10 entries \
             but this mqlb needs key 16 B / value 16 B / 20 entries; it was left by another \
             build: run `mqlb down --iface eth0` (drops conntrack) and start again"
        );
    }
}
