//! Privileged layers need root. Without it they say so loudly and return;
//! under `CI=true` a missing privilege is a failure, never a silent skip.

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // /proc/self/status "Uid: real effective saved fs"
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Returns `true` when the privileged test may run. Panics under `CI=true`
/// without root; otherwise prints a loud skip line and returns `false`.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    let ci = std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false);
    assert!(
        !ci,
        "{test}: needs root, and CI=true forbids skipping privileged tests"
    );
    eprintln!("SKIPPED {test}: needs root (run `sudo -E cargo xtask test`)");
    false
}

/// Declares one test per XDP mode for each `body: skb_name, native_name;`,
/// each first requiring root ([`require_root`]): generic (skb) mode, and
/// native mode (XDP_TX into a veth, whose peer then needs an XDP program:
/// the lab attaches `mqlb decap` there).
#[macro_export]
macro_rules! in_both_modes {
    ($($body:ident: $skb:ident, $native:ident;)+) => {$(
        #[test]
        fn $skb() {
            if $crate::privileged::require_root(stringify!($skb)) {
                $body($crate::lab::XdpMode::Skb);
            }
        }

        #[test]
        fn $native() {
            if $crate::privileged::require_root(stringify!($native)) {
                $body($crate::lab::XdpMode::Native);
            }
        }
    )+};
}
