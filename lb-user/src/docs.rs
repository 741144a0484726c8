//! `mqlb completions SHELL` and `mqlb man [--out DIR]`: shell completion
//! scripts and man pages, generated from the clap definitions in [`crate::cli`]
//! so they never drift from `--help`.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
};

use clap::CommandFactory as _;
pub use clap_complete::Shell;

use crate::cli::Cli;

/// Why `completions` or `man` failed.
#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    #[error("cannot write to stdout")]
    Stdout(#[source] io::Error),
    #[error("cannot write {path}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The completion script for `shell`.
pub fn completions(shell: Shell) -> Vec<u8> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "mqlb", &mut out);
    out
}

/// Renders `mqlb.1` (the top-level page, which lists the subcommands).
pub fn man_page(out: &mut dyn Write) -> io::Result<()> {
    clap_mangen::Man::new(Cli::command()).render(out)
}

/// Writes `mqlb.1` and one page per (nested) subcommand, `mqlb-service.1`,
/// `mqlb-service-add.1`, ..., into `dir` (created if missing). Returns the
/// files written, the top-level page first.
pub fn write_man_pages(dir: &Path) -> Result<Vec<PathBuf>, DocsError> {
    std::fs::create_dir_all(dir).map_err(|source| DocsError::File {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write_pages(cmd, dir, &mut written)?;
    Ok(written)
}

fn write_pages(
    cmd: clap::Command,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<(), DocsError> {
    let subs: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let man = clap_mangen::Man::new(cmd);
    let path = dir.join(man.get_filename());
    man.generate_to(dir).map_err(|source| DocsError::File {
        path: path.clone(),
        source,
    })?;
    written.push(path);
    for sub in subs {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}

/// `mqlb completions SHELL`.
pub fn print_completions(shell: Shell) -> Result<(), DocsError> {
    // Generated into memory first: clap_complete panics on a write error
    // (`mqlb completions bash | head`).
    let script = completions(shell);
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(&script)
        .and_then(|()| stdout.flush())
        .map_err(DocsError::Stdout)
}

/// `mqlb man [--out DIR]`: `mqlb.1` on stdout, or every page into DIR (the
/// paths written go to stdout, one a line).
pub fn print_man(out: Option<&Path>) -> Result<(), DocsError> {
    let mut stdout = io::stdout().lock();
    match out {
        None => man_page(&mut stdout).map_err(DocsError::Stdout)?,
        Some(dir) => {
            for path in write_man_pages(dir)? {
                writeln!(stdout, "{}", path.display()).map_err(DocsError::Stdout)?;
            }
        }
    }
    stdout.flush().map_err(DocsError::Stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bash_completions_name_the_subcommands() {
        let script = String::from_utf8(completions(Shell::Bash)).unwrap();
        for sub in [
            "up",
            "down",
            "service",
            "backend",
            "stats",
            "decap",
            "completions",
            "man",
        ] {
            assert!(script.contains(sub), "no {sub} in the bash completions");
        }
        assert!(script.contains("--iface"));
    }

    #[test]
    fn every_shell_generates_something() {
        for shell in [
            Shell::Bash,
            Shell::Zsh,
            Shell::Fish,
            Shell::Elvish,
            Shell::PowerShell,
        ] {
            let out = completions(shell);
            assert!(out.len() > 100, "{shell}: {} bytes", out.len());
        }
    }

    #[test]
    fn man_page_is_roff_and_lists_service() {
        let mut out = Vec::new();
        man_page(&mut out).unwrap();
        let page = String::from_utf8(out).unwrap();
        // roff's own preamble (the apostrophe string, `.ie`/`.el`) comes
        // first, then the title line.
        let title = page
            .lines()
            .find(|l| !l.starts_with(".ie ") && !l.starts_with(".el "));
        assert!(
            title.is_some_and(|l| l.starts_with(".TH mqlb 1")),
            "{}",
            &page[..page.len().min(120)]
        );
        assert!(page.contains("service"));
    }

    #[test]
    fn man_out_writes_one_page_per_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("man1");
        let written = write_man_pages(&out).unwrap();
        assert_eq!(written[0], out.join("mqlb.1"));
        for name in [
            "mqlb.1",
            "mqlb-service.1",
            "mqlb-service-add.1",
            "mqlb-up.1",
        ] {
            let page = std::fs::read_to_string(out.join(name)).unwrap();
            assert!(page.contains("\n.TH "), "{name}");
        }
        assert!(!out.join("mqlb-help.1").exists());
    }

    /// `KEY=VALUE` lines of a systemd unit section or an environment file
    /// (comments and blank lines skipped; quotes around a value removed).
    fn key_values(text: &str, want_section: Option<&str>) -> Vec<(String, String)> {
        let mut section = "";
        let mut out = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if line.starts_with('[') {
                assert!(line.ends_with(']'), "bad section header {line:?}");
                section = line;
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {line:?}"));
            if want_section.is_none_or(|w| w == section) {
                let value = value.trim().trim_matches('"');
                out.push((key.trim().to_string(), value.to_string()));
            }
        }
        out
    }

    /// The shipped unit runs `mqlb up` for the interface its environment file
    /// names, and that command line parses, with and without extra flags.
    #[test]
    fn systemd_unit_runs_up_for_the_configured_interface() {
        let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib");
        let unit = std::fs::read_to_string(contrib.join("mqlb.service")).unwrap();
        let service = key_values(&unit, Some("[Service]"));
        let get = |key: &str| -> Vec<&str> {
            service
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(get("EnvironmentFile"), ["/etc/default/mqlb"]);
        let exec = get("ExecStart");
        assert_eq!(exec.len(), 1, "{exec:?}");

        let default = std::fs::read_to_string(contrib.join("mqlb.default")).unwrap();
        let env = key_values(&default, None);
        let var = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let iface = var("MQLB_IFACE").expect("the sample sets MQLB_IFACE");
        // systemd: `${X}` is one word, `$X` splits on whitespace.
        let expand = |opts: &str| -> Vec<String> {
            exec[0]
                .split_whitespace()
                .flat_map(|w| match w {
                    "${MQLB_IFACE}" => vec![iface.clone()],
                    "$MQLB_OPTS" => opts.split_whitespace().map(str::to_string).collect(),
                    w => vec![w.to_string()],
                })
                .collect()
        };
        let example = default
            .lines()
            .find_map(|l| l.strip_prefix("#MQLB_OPTS="))
            .expect("the sample shows MQLB_OPTS in use")
            .trim_matches('"')
            .to_string();
        for opts in [var("MQLB_OPTS").unwrap_or_default(), example] {
            let argv = expand(&opts);
            assert!(argv[0].ends_with("/mqlb"), "{argv:?}");
            let cli = <Cli as clap::Parser>::try_parse_from(&argv)
                .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            let crate::cli::Command::Up(up) = cli.command else {
                panic!("ExecStart is not `mqlb up`");
            };
            assert_eq!(up.iface, iface);
        }
    }
}
