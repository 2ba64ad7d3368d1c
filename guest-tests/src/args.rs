//! Command-line parsing. Hand-written rather than clap: the grammar is tiny, and the
//! kernel command line turns every comma of `vup.args=` into a space, so `--threads 1,4,16`
//! arrives as `--threads 1 4 16`; the numbers after `--threads` are all taken.

use std::path::PathBuf;

use thiserror::Error;

use crate::cases::suites::{self, SuiteDef};

/// Before the suites in `--help`.
const USAGE_HEAD: &str = "\
usage: pmem-guest-tests [OPTIONS] SUITE...

Runs each SUITE in order inside the guest and prints one TAP stream on stdout.
Exit status 0 iff every case is ok.

Suites:
";

/// After the suites in `--help`.
const USAGE_TAIL: &str = "
Each case of faults/mapsync/truncate/pmd runs in a forked child with a deadline: a hang
is reported as `not ok N - name # hung after Xs` and the suite goes on. Every case fails
if the kernel log gains a WARNING:/BUG:/Oops/hung-task/general protection line.

Options:
  --dev PATH         pmem block device [default: /dev/pmem0]
  --mnt PATH         mount point [default: /mnt/pmem]
  --fs ext4|xfs      filesystem to make and mount [default: ext4]
  --mkfs             make a fresh filesystem before the run's first mount
  --expect-gen N     generation persist.dat must hold (persist; e2e uses 0: no file);
                     boot+N means N plus this boot's number inside one QEMU process
                     ($VUP_BOOT from init, 1 for the first boot), for reboot runs
  --iters N          measured iterations per thread (latency) [default: 200]
  --samples N        instead of --iters: N measured operations per op and
                     concurrency, split over its threads (at least 1 each)
  --threads LIST     concurrencies, separated by ',' ':' or spaces [default: 1]
  --pair-pci ADDR    PCI address of QEMU's built-in pmem device beside the
                     vhost-user one (vmrun --pair-builtin passes it; paired)
  --blocks N         paired: blocks of --iters ops per device and flush kind,
                     alternating the devices [default: 20]
  --stress DURATION  run each time-bounded case (hole_waiters rounds, the races,
                     flush_queue_full) for DURATION instead of its short TCG default:
                     plain seconds (90) or with a unit (90s, 10m, 2h); at most 24h
  --only NAME        run only this catalogue case (repeatable); setup cases still run
  --crash-at-end     after the suites, print the plan and crash the kernel (sysrq c)
                     with the filesystem still mounted, instead of sync + umount
                     (the crash half of the persistence test)
  -h, --help         print this help
";

/// `--help`: the suites come from the table that parsing uses, so it cannot miss one.
pub fn usage() -> String {
    format!("{USAGE_HEAD}{}{USAGE_TAIL}", suites::help_text())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Args {
    pub dev: PathBuf,
    pub mnt: PathBuf,
    pub fs: FsType,
    pub mkfs: bool,
    pub expect_gen: Option<u64>,
    pub iters: usize,
    /// --samples: measured ops per op and concurrency, split over the threads.
    pub samples: Option<usize>,
    pub threads: Vec<usize>,
    /// In run order, aliases expanded.
    pub suites: Vec<&'static SuiteDef>,
    pub crash_at_end: bool,
    /// --stress: how long each time-bounded case runs, instead of its default.
    pub stress_secs: Option<u64>,
    /// --only: run only these catalogue cases (empty: all).
    pub only: Vec<String>,
    /// --pair-pci: where the built-in device of a paired run sits (`0000:00:06.0`).
    pub pair_pci: Option<String>,
    /// --blocks: how many alternating blocks the paired suite measures.
    pub blocks: usize,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            dev: PathBuf::from("/dev/pmem0"),
            mnt: PathBuf::from("/mnt/pmem"),
            fs: FsType::Ext4,
            mkfs: false,
            expect_gen: None,
            iters: 200,
            samples: None,
            threads: vec![1],
            suites: Vec::new(),
            crash_at_end: false,
            stress_secs: None,
            only: Vec::new(),
            pair_pci: None,
            blocks: 20,
        }
    }
}

impl Args {
    /// Measured ops per thread at `threads`: --samples split over the threads (rounded
    /// up, at least 1), else --iters.
    pub fn iters_per_thread(&self, threads: usize) -> usize {
        match self.samples {
            Some(n) => n.div_ceil(threads.max(1)).max(1),
            None => self.iters,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Box<Args>),
    Help,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgError {
    #[error("option {0} needs a value")]
    MissingValue(String),
    #[error("invalid value {value:?} for {option}: {why}")]
    BadValue {
        option: String,
        value: String,
        why: &'static str,
    },
    #[error("unknown option {0}")]
    UnknownOption(String),
    #[error("unknown suite {0:?} (expected {expected})", expected = suites::names_in_words())]
    UnknownSuite(String),
    #[error("no suite given")]
    NoSuite,
}

/// Upper bound on threads: more only measures the guest scheduler under TCG.
const MAX_THREADS: usize = 1024;

/// A day: anything longer is a typo, and the runner's own timeout would fire first.
const MAX_STRESS_SECS: u64 = 86_400;

/// `--stress`: plain seconds, or a number with `s`, `m` or `h`; between 1 s and a day.
fn parse_duration(option: &str, value: &str) -> Result<u64, ArgError> {
    let bad = |why| ArgError::BadValue {
        option: option.into(),
        value: value.into(),
        why,
    };
    let (digits, unit) = match value.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => value.split_at(i),
        None => (value, ""),
    };
    let scale: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => {
            return Err(bad(
                "expected seconds, or a number with s, m or h (90, 90s, 10m, 2h)",
            ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| bad("expected seconds, or a number with s, m or h (90, 90s, 10m, 2h)"))?;
    match n.checked_mul(scale) {
        Some(secs) if (1..=MAX_STRESS_SECS).contains(&secs) => Ok(secs),
        _ => Err(bad("must be between 1 s and 24 h")),
    }
}

fn parse_number<T: std::str::FromStr>(option: &str, value: &str) -> Result<T, ArgError> {
    value.parse().map_err(|_| ArgError::BadValue {
        option: option.into(),
        value: value.into(),
        why: "not a non-negative integer",
    })
}

/// `boot+N`: every boot of a reboot run (same kernel command line) expects one generation more
/// than the boot before it.
fn boot_relative(option: &str, value: &str, n: u64, boot: Option<&str>) -> Result<u64, ArgError> {
    let boot: u64 = boot
        .and_then(|b| b.trim().parse().ok())
        .ok_or_else(|| ArgError::BadValue {
            option: option.into(),
            value: value.into(),
            why: "boot+N needs VUP_BOOT, which the guest's init sets",
        })?;
    n.checked_add(boot).ok_or_else(|| ArgError::BadValue {
        option: option.into(),
        value: value.into(),
        why: "too large",
    })
}

fn parse_threads(value: &str, into: &mut Vec<usize>) -> Result<(), ArgError> {
    for part in value.split([',', ':']).filter(|p| !p.is_empty()) {
        let n: usize = parse_number("--threads", part)?;
        if n == 0 || n > MAX_THREADS {
            return Err(ArgError::BadValue {
                option: "--threads".into(),
                value: part.into(),
                why: "must be between 1 and 1024",
            });
        }
        into.push(n);
    }
    Ok(())
}

fn looks_like_thread_list(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_digit() || c == ',' || c == ':')
}

pub fn parse<I: IntoIterator<Item = String>>(argv: I) -> Result<Command, ArgError> {
    let mut args = Args::default();
    let mut threads: Vec<usize> = Vec::new();
    let mut it = argv.into_iter().peekable();
    while let Some(arg) = it.next() {
        // Accept both `--opt value` and `--opt=value`.
        let (opt, inline) = match arg.split_once('=') {
            Some((o, v)) if o.starts_with("--") => (o.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let value = |it: &mut std::iter::Peekable<I::IntoIter>| -> Result<String, ArgError> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it.next().ok_or_else(|| ArgError::MissingValue(opt.clone())),
            }
        };
        match opt.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--dev" => args.dev = PathBuf::from(value(&mut it)?),
            "--mnt" => args.mnt = PathBuf::from(value(&mut it)?),
            "--fs" => {
                let v = value(&mut it)?;
                args.fs = match v.as_str() {
                    "ext4" => FsType::Ext4,
                    "xfs" => FsType::Xfs,
                    _ => {
                        return Err(ArgError::BadValue {
                            option: opt,
                            value: v,
                            why: "expected ext4 or xfs",
                        })
                    }
                };
            }
            "--mkfs" => args.mkfs = true,
            "--crash-at-end" => args.crash_at_end = true,
            "--expect-gen" => {
                let v = value(&mut it)?;
                args.expect_gen = Some(match v.strip_prefix("boot+") {
                    Some(n) => boot_relative(
                        &opt,
                        &v,
                        parse_number(&opt, n)?,
                        std::env::var("VUP_BOOT").ok().as_deref(),
                    )?,
                    None => parse_number(&opt, &v)?,
                });
            }
            "--iters" => {
                let v = value(&mut it)?;
                args.iters = parse_number(&opt, &v)?;
                if args.iters == 0 {
                    return Err(ArgError::BadValue {
                        option: opt,
                        value: v,
                        why: "must be at least 1",
                    });
                }
            }
            "--samples" => {
                let v = value(&mut it)?;
                let n: usize = parse_number(&opt, &v)?;
                if n == 0 {
                    return Err(ArgError::BadValue {
                        option: opt,
                        value: v,
                        why: "must be at least 1",
                    });
                }
                args.samples = Some(n);
            }
            "--stress" => {
                let v = value(&mut it)?;
                args.stress_secs = Some(parse_duration(&opt, &v)?);
            }
            "--only" => args.only.push(value(&mut it)?),
            "--pair-pci" => args.pair_pci = Some(value(&mut it)?),
            "--blocks" => {
                let v = value(&mut it)?;
                args.blocks = parse_number(&opt, &v)?;
                if !(1..=1000).contains(&args.blocks) {
                    return Err(ArgError::BadValue {
                        option: opt,
                        value: v,
                        why: "must be between 1 and 1000",
                    });
                }
            }
            "--threads" => {
                parse_threads(&value(&mut it)?, &mut threads)?;
                while let Some(next) = it.next_if(|a| looks_like_thread_list(a)) {
                    parse_threads(&next, &mut threads)?;
                }
            }
            o if o.starts_with('-') => return Err(ArgError::UnknownOption(arg)),
            _ => match suites::find(&arg) {
                Some(entry) => args.suites.extend(entry.suites()),
                None => return Err(ArgError::UnknownSuite(arg)),
            },
        }
    }
    if !threads.is_empty() {
        args.threads = threads;
    }
    if args.suites.is_empty() {
        return Err(ArgError::NoSuite);
    }
    Ok(Command::Run(Box::new(args)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(a: &Args) -> Vec<&'static str> {
        a.suites.iter().map(|s| s.name).collect()
    }

    fn run(line: &str) -> Result<Args, ArgError> {
        match parse(line.split_whitespace().map(String::from))? {
            Command::Run(a) => Ok(*a),
            Command::Help => panic!("unexpected help"),
        }
    }

    #[test]
    fn defaults() {
        let a = run("e2e").unwrap();
        assert_eq!(a.dev, PathBuf::from("/dev/pmem0"));
        assert_eq!(a.mnt, PathBuf::from("/mnt/pmem"));
        assert_eq!(a.fs, FsType::Ext4);
        assert!(!a.mkfs);
        assert_eq!(a.expect_gen, None);
        assert_eq!(a.iters, 200);
        assert_eq!(a.threads, vec![1]);
        assert_eq!(names(&a), ["e2e"]);
        assert!(!a.crash_at_end);
        assert_eq!(a.stress_secs, None);
        assert!(a.only.is_empty());
    }

    #[test]
    fn catalogue_suites_and_options() {
        let a = run("--stress 60 --only hole_waiters --only=pmd_ops catalogue e2e").unwrap();
        assert_eq!(names(&a), ["faults", "mapsync", "truncate", "pmd", "e2e"]);
        assert_eq!(a.stress_secs, Some(60));
        assert_eq!(a.only, vec!["hole_waiters", "pmd_ops"]);
        assert_eq!(names(&run("--fs xfs pmd").unwrap()), ["pmd"]);
        assert_eq!(
            names(&run("rebind readonly soak fsyncloop").unwrap()),
            ["rebind", "readonly", "soak", "fsyncloop"]
        );
        assert!(matches!(
            run("--stress 0 faults"),
            Err(ArgError::BadValue { .. })
        ));
        assert!(matches!(
            run("--stress 100000 faults"),
            Err(ArgError::BadValue { .. })
        ));
        assert_eq!(run("--stress 90s faults").unwrap().stress_secs, Some(90));
        assert_eq!(run("--stress 10m faults").unwrap().stress_secs, Some(600));
        assert_eq!(run("--stress=2h faults").unwrap().stress_secs, Some(7200));
        assert_eq!(
            run("--stress 24h faults").unwrap().stress_secs,
            Some(86_400)
        );
        for bad in ["25h", "0m", "10x", "m", "1.5m", "-5", "10 m", ""] {
            assert!(
                matches!(
                    parse([
                        "--stress".to_string(),
                        bad.to_string(),
                        "faults".to_string()
                    ]),
                    Err(ArgError::BadValue { .. })
                ),
                "{bad:?}"
            );
        }
        assert_eq!(names(&run("flush").unwrap()), ["flush"]);
        assert_eq!(
            run("faults --only"),
            Err(ArgError::MissingValue("--only".into()))
        );
    }

    #[test]
    fn all_options() {
        let a = run(
            "--dev /dev/pmem1 --mnt=/m --fs xfs --mkfs --expect-gen 3 --iters 50 \
                     --threads 1,4,16 --crash-at-end e2e latency persist",
        )
        .unwrap();
        assert_eq!(a.dev, PathBuf::from("/dev/pmem1"));
        assert_eq!(a.mnt, PathBuf::from("/m"));
        assert_eq!(a.fs, FsType::Xfs);
        assert!(a.mkfs);
        assert_eq!(a.expect_gen, Some(3));
        assert_eq!(a.iters, 50);
        assert_eq!(a.threads, vec![1, 4, 16]);
        assert_eq!(names(&a), ["e2e", "latency", "persist"]);
        assert!(a.crash_at_end);
    }

    #[test]
    fn threads_survive_comma_to_space_rewriting() {
        // What init.sh hands over for vup.args=--threads,1,4,16,latency
        assert_eq!(
            run("--threads 1 4 16 latency").unwrap().threads,
            vec![1, 4, 16]
        );
        assert_eq!(run("--threads 1:4 latency").unwrap().threads, vec![1, 4]);
        assert_eq!(
            run("--threads=2 --threads 8 latency").unwrap().threads,
            vec![2, 8]
        );
    }

    #[test]
    fn samples_split_over_threads() {
        let a = run("--samples 1000 --threads 1:4:16:64 bench").unwrap();
        assert_eq!(names(&a), ["latency", "faultlat"]);
        assert_eq!(a.samples, Some(1000));
        let per: Vec<usize> = a.threads.iter().map(|&t| a.iters_per_thread(t)).collect();
        assert_eq!(per, vec![1000, 250, 63, 16]);
        assert_eq!(
            run("--samples 2 --threads 8 latency")
                .unwrap()
                .iters_per_thread(8),
            1
        );
        // Without --samples, --iters is per thread whatever the concurrency.
        assert_eq!(run("--iters 7 latency").unwrap().iters_per_thread(64), 7);
        assert!(matches!(
            run("--samples 0 latency"),
            Err(ArgError::BadValue { .. })
        ));
        assert_eq!(names(&run("faultlat").unwrap()), ["faultlat"]);
    }

    #[test]
    fn paired_options() {
        let a = run("--pair-pci 0000:00:06.0 --blocks=5 --iters 30 paired").unwrap();
        assert_eq!(a.pair_pci.as_deref(), Some("0000:00:06.0"));
        assert_eq!((a.blocks, a.iters), (5, 30));
        assert_eq!(names(&a), ["paired"]);
        assert_eq!(run("paired").unwrap().blocks, 20);
        for bad in [
            "--blocks 0 paired",
            "--blocks 1001 paired",
            "--blocks x paired",
        ] {
            assert!(matches!(run(bad), Err(ArgError::BadValue { .. })), "{bad}");
        }
    }

    #[test]
    fn help() {
        assert_eq!(
            parse(["e2e".to_string(), "-h".to_string()]),
            Ok(Command::Help)
        );
    }

    #[test]
    fn errors() {
        assert_eq!(run(""), Err(ArgError::NoSuite));
        assert_eq!(run("--mkfs"), Err(ArgError::NoSuite));
        assert_eq!(run("nope"), Err(ArgError::UnknownSuite("nope".into())));
        assert_eq!(
            run("--bogus e2e"),
            Err(ArgError::UnknownOption("--bogus".into()))
        );
        assert_eq!(
            run("e2e --dev"),
            Err(ArgError::MissingValue("--dev".into()))
        );
        assert!(matches!(
            run("--iters 0 latency"),
            Err(ArgError::BadValue { .. })
        ));
        assert!(matches!(
            run("--iters x latency"),
            Err(ArgError::BadValue { .. })
        ));
        assert!(matches!(
            run("--threads 0 latency"),
            Err(ArgError::BadValue { .. })
        ));
        assert!(matches!(
            run("--threads 2000 latency"),
            Err(ArgError::BadValue { .. })
        ));
        assert!(matches!(
            run("--fs btrfs e2e"),
            Err(ArgError::BadValue { .. })
        ));
        assert!(matches!(
            run("--expect-gen -1 persist"),
            Err(ArgError::BadValue { .. })
        ));
    }

    #[test]
    fn expect_gen_relative_to_the_boot() {
        assert_eq!(
            boot_relative("--expect-gen", "boot+1", 1, Some("1")).unwrap(),
            2
        );
        assert_eq!(
            boot_relative("--expect-gen", "boot+1", 1, Some("3")).unwrap(),
            4
        );
        assert!(boot_relative("--expect-gen", "boot+1", 1, None).is_err());
        assert!(boot_relative("--expect-gen", "boot+1", 1, Some("x")).is_err());
    }
}
