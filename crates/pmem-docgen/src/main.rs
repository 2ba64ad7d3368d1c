//! pmem-docgen: writes the man page and the shell completions of vhost-user-pmem from its clap
//! definition (`vhost_user_pmem::args::Args`) into `contrib/`, or, with `--check`, renders them
//! in memory and fails if the committed copies differ. The files are committed so that packaging
//! needs no build of this tool; the check is what keeps them from going stale when `--help`
//! changes.

mod diff;
mod man;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use clap_complete::Shell;

use vhost_user_pmem::args::Args;

/// The name the daemon is installed and completed as.
const BIN: &str = "vhost-user-pmem";

/// Write contrib/man/vhost-user-pmem.1 and the bash, zsh and fish completions in
/// contrib/completions/ from the daemon's clap definition.
///
/// Exit status: 0 when every file was written (or, with --check, is up to date); 1 when a
/// committed file differs from what the definition renders now (with --check), or a file
/// cannot be read or written; 2 for a usage error.
#[derive(Parser, Debug)]
#[command(version, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// Write nothing: render every file in memory, compare it with the committed one, print
    /// a diff of each that differs and exit 1 if any does.
    #[arg(long)]
    check: bool,

    /// The repository root [default: the checkout this tool was built from].
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot render the man page: {0}")]
    Render(std::io::Error),
}

/// One generated file: its path relative to the repository root, and its contents.
struct Output {
    path: &'static str,
    bytes: Vec<u8>,
}

fn completion(shell: Shell) -> Vec<u8> {
    let mut cmd = Args::command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, BIN, &mut buf);
    buf
}

/// Every generated file, in the order they are reported.
fn outputs() -> Result<Vec<Output>, Error> {
    Ok(vec![
        Output {
            path: "contrib/man/vhost-user-pmem.1",
            bytes: man::render(Args::command()).map_err(Error::Render)?,
        },
        Output {
            path: "contrib/completions/vhost-user-pmem.bash",
            bytes: completion(Shell::Bash),
        },
        Output {
            path: "contrib/completions/_vhost-user-pmem",
            bytes: completion(Shell::Zsh),
        },
        Output {
            path: "contrib/completions/vhost-user-pmem.fish",
            bytes: completion(Shell::Fish),
        },
    ])
}

/// Writes each output whose file differs (so that an unchanged file keeps its mtime).
fn write(root: &Path, outputs: &[Output]) -> Result<(), Error> {
    for out in outputs {
        let path = root.join(out.path);
        let same = std::fs::read(&path).is_ok_and(|old| old == out.bytes);
        if same {
            println!("unchanged {}", out.path);
            continue;
        }
        let err = |source| Error::Write {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        std::fs::write(&path, &out.bytes).map_err(err)?;
        println!("wrote {}", out.path);
    }
    Ok(())
}

/// Compares each output with its committed file; returns how many differ or are missing.
fn check(root: &Path, outputs: &[Output]) -> Result<usize, Error> {
    let mut stale = 0;
    for out in outputs {
        let path = root.join(out.path);
        let old = match std::fs::read(&path) {
            Ok(old) => old,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("pmem-docgen: {} is missing", out.path);
                stale += 1;
                continue;
            }
            Err(source) => return Err(Error::Read { path, source }),
        };
        if old == out.bytes {
            continue;
        }
        stale += 1;
        eprintln!(
            "pmem-docgen: {} differs from what `{BIN} --help` renders now:",
            out.path
        );
        let old = String::from_utf8_lossy(&old);
        let new = String::from_utf8_lossy(&out.bytes);
        eprint!("{}", diff::unified(out.path, &old, &new));
    }
    Ok(stale)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The tool runs from a checkout (cargo run, scripts/package.sh), two levels below the root.
    let root = cli
        .root
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
    let result = outputs().and_then(|outputs| run(cli.check, &root, &outputs));
    result.unwrap_or_else(|e| {
        eprintln!("pmem-docgen: error: {e}");
        ExitCode::FAILURE
    })
}

fn run(check_only: bool, root: &Path, outputs: &[Output]) -> Result<ExitCode, Error> {
    if check_only {
        let stale = check(root, outputs)?;
        if stale == 0 {
            println!("pmem-docgen: {} files up to date", outputs.len());
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!(
            "pmem-docgen: {stale} file(s) stale; regenerate with `cargo run -p pmem-docgen` and commit them"
        );
        return Ok(ExitCode::FAILURE);
    }
    write(root, outputs)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn rendering_is_deterministic() {
        // --check compares bytes, so anything time- or environment-dependent (a date, a
        // terminal width) in the output would make every check fail.
        for (a, b) in outputs().unwrap().iter().zip(outputs().unwrap().iter()) {
            assert!(a.bytes == b.bytes, "{} differs between two renders", a.path);
        }
    }

    #[test]
    fn completions_name_every_option() {
        let cmd = Args::command();
        for out in outputs()
            .unwrap()
            .iter()
            .filter(|o| o.path.contains("completions"))
        {
            let text = String::from_utf8_lossy(&out.bytes);
            for arg in cmd.get_arguments() {
                let long = arg.get_long().expect("the daemon has long options only");
                assert!(text.contains(long), "{} lacks --{long}", out.path);
            }
        }
    }

    #[test]
    fn check_reports_missing_and_changed_files() {
        let dir = std::env::temp_dir().join(format!("pmem-docgen-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let outs = outputs().unwrap();
        assert_eq!(check(&dir, &outs).unwrap(), outs.len());
        write(&dir, &outs).unwrap();
        assert_eq!(check(&dir, &outs).unwrap(), 0);
        let man = dir.join(outs[0].path);
        let mut text = std::fs::read_to_string(&man).unwrap();
        text.push_str(".\\\" edited by hand\n");
        std::fs::write(&man, text).unwrap();
        assert_eq!(check(&dir, &outs).unwrap(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
