//! The one table of suites: argument parsing, `--help` and dispatch all read [`TABLE`], so a
//! new suite is a `SuiteDef` in its case file plus one line here.

use std::fmt;

use super::{
    fault_latency, faults, fill, flush, flush_latency, fsync_loop, map_sync, paired, persist, pmd,
    readonly, rebind, selftest, soak, truncate, Ctx,
};
use crate::sys;

/// A suite: a named sequence of cases, run by `run` against the shared context.
pub struct SuiteDef {
    pub name: &'static str,
    /// Its description in `--help`, one string per line.
    pub help: &'static [&'static str],
    pub run: fn(&mut Ctx),
}

// By name: the names are unique (tested below), and comparing fn pointers is unreliable.
impl PartialEq for SuiteDef {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for SuiteDef {}

impl fmt::Debug for SuiteDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// A name that stands for several suites, run in this order.
pub struct AliasDef {
    pub name: &'static str,
    pub help: &'static [&'static str],
    pub suites: &'static [&'static SuiteDef],
}

pub enum Entry {
    Suite(&'static SuiteDef),
    Alias(&'static AliasDef),
}

impl Entry {
    pub fn name(&self) -> &'static str {
        match self {
            Entry::Suite(s) => s.name,
            Entry::Alias(a) => a.name,
        }
    }

    fn help(&self) -> &'static [&'static str] {
        match self {
            Entry::Suite(s) => s.help,
            Entry::Alias(a) => a.help,
        }
    }

    /// The suites this name runs, in order.
    pub fn suites(&self) -> &[&'static SuiteDef] {
        match self {
            Entry::Suite(s) => std::slice::from_ref(s),
            Entry::Alias(a) => a.suites,
        }
    }
}

const BENCH: AliasDef = AliasDef {
    name: "bench",
    help: &["latency faultlat, in that order (what scripts/bench-guest.sh runs)"],
    suites: &[&flush_latency::SUITE, &fault_latency::SUITE],
};

const CATALOGUE: AliasDef = AliasDef {
    name: "catalogue",
    help: &["faults mapsync truncate pmd, in that order"],
    suites: &[
        &faults::SUITE,
        &map_sync::SUITE,
        &truncate::SUITE,
        &pmd::SUITE,
    ],
};

/// Every suite name, in the order `--help` and the "unknown suite" error list them.
pub const TABLE: &[Entry] = &[
    Entry::Suite(&persist::E2E),
    Entry::Suite(&persist::PERSIST),
    Entry::Suite(&flush_latency::SUITE),
    Entry::Suite(&fault_latency::SUITE),
    Entry::Alias(&BENCH),
    Entry::Suite(&paired::SUITE),
    Entry::Suite(&faults::SUITE),
    Entry::Suite(&map_sync::SUITE),
    Entry::Suite(&truncate::SUITE),
    Entry::Suite(&pmd::SUITE),
    Entry::Suite(&flush::SUITE),
    Entry::Alias(&CATALOGUE),
    Entry::Suite(&selftest::SUITE),
    Entry::Suite(&rebind::SUITE),
    Entry::Suite(&readonly::SUITE),
    Entry::Suite(&soak::SUITE),
    Entry::Suite(&fsync_loop::SUITE),
    Entry::Suite(&fill::SUITE),
];

pub fn find(name: &str) -> Option<&'static Entry> {
    TABLE.iter().find(|e| e.name() == name)
}

/// "a, b, ... or z": the names for an error message.
pub fn names_in_words() -> String {
    let names: Vec<&str> = TABLE.iter().map(Entry::name).collect();
    match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// The "Suites:" block of `--help`: the name, then its description, continued under itself.
pub fn help_text() -> String {
    const NAME_WIDTH: usize = 10;
    let mut out = String::new();
    for entry in TABLE {
        for (i, line) in entry.help().iter().enumerate() {
            let name = if i == 0 { entry.name() } else { "" };
            out.push_str(&format!("  {name:<NAME_WIDTH$} {line}\n"));
        }
    }
    out
}

pub fn run_suite(ctx: &mut Ctx, suite: &SuiteDef) {
    ctx.diag(&format!("suite {}", suite.name));
    let started = sys::monotonic_raw_ns();
    (suite.run)(ctx);
    let secs = (sys::monotonic_raw_ns() - started) as f64 / 1e9;
    // A diagnostic, not a VUP-METRIC line: those are latency rows for scripts/demo.sh.
    ctx.diag(&format!(
        "suite {} took {secs:.1} s (fs {})",
        suite.name,
        ctx.args.fs.name()
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{self, Command};

    #[test]
    fn names_are_unique() {
        let mut names: Vec<&str> = TABLE.iter().map(Entry::name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "a suite name is in the table twice");
    }

    #[test]
    fn every_entry_parses_to_its_suites() {
        for entry in TABLE {
            match args::parse([entry.name().to_string()]) {
                Ok(Command::Run(a)) => assert_eq!(a.suites, entry.suites(), "{}", entry.name()),
                other => panic!("{}: {other:?}", entry.name()),
            }
        }
    }

    #[test]
    fn every_entry_is_in_the_help_with_its_description() {
        let usage = args::usage();
        for entry in TABLE {
            assert!(
                !entry.help().is_empty(),
                "{} has no description",
                entry.name()
            );
            let first = format!("\n  {:<10} {}\n", entry.name(), entry.help()[0]);
            assert!(
                usage.contains(&first),
                "{} missing from --help",
                entry.name()
            );
            for line in entry.help() {
                assert!(usage.contains(line), "{}: {line:?}", entry.name());
            }
        }
    }

    #[test]
    fn aliases_name_suites_of_the_table() {
        for entry in TABLE {
            for s in entry.suites() {
                assert!(
                    matches!(find(s.name), Some(Entry::Suite(t)) if t == s),
                    "{} runs {}, which the table does not list as a suite",
                    entry.name(),
                    s.name
                );
            }
        }
    }

    #[test]
    fn error_lists_every_name() {
        assert_eq!(
            names_in_words(),
            "e2e, persist, latency, faultlat, bench, paired, faults, mapsync, truncate, pmd, flush, \
             catalogue, selftest, rebind, readonly, soak, fsyncloop or fill"
        );
    }
}
