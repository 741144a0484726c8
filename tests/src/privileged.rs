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
