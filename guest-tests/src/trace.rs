//! The fs_dax `dax_pmd_fault_done` tracepoint: the one direct witness of whether a DAX
//! fault was served by a PMD (result NOPAGE) or fell back to 4 KiB pages (FALLBACK).
//! smaps cannot tell: fsdax PMDs do not count as FilePmdMapped.

use std::path::{Path, PathBuf};

const TRACEFS: &str = "/sys/kernel/tracing";
/// A private trace instance, so the global buffer stays as the user left it.
const INSTANCE: &str = "instances/pmem-guest-tests";
const PMD_EVENT: &str = "fs_dax/dax_pmd_fault_done";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PmdFault {
    pub ino: u64,
    pub write: bool,
    pub address: u64,
    pub pgoff: u64,
    /// The VM_FAULT_* names, e.g. "NOPAGE" or "FALLBACK" ("" when none).
    pub result: String,
}

impl PmdFault {
    pub fn is_pmd(&self) -> bool {
        self.result.split('|').any(|r| r == "NOPAGE")
    }

    pub fn is_fallback(&self) -> bool {
        self.result.split('|').any(|r| r == "FALLBACK")
    }
}

fn hex(t: &str) -> Option<u64> {
    u64::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16).ok()
}

/// Parse one line of the trace file. The event prints
/// "dev M:m ino 0x.. shared|private FLAGS address 0x.. vm_start 0x.. vm_end 0x..
///  pgoff 0x.. max_pgoff 0x.. RESULT" (FLAGS and RESULT may be empty).
pub fn parse_line(line: &str) -> Option<PmdFault> {
    let (_, rest) = line.split_once("dax_pmd_fault_done:")?;
    let toks: Vec<&str> = rest.split_whitespace().collect();
    let after = |key: &str| -> Option<&str> {
        let i = toks.iter().position(|t| *t == key)?;
        toks.get(i + 1).copied()
    };
    let ino = hex(after("ino")?)?;
    let address = hex(after("address")?)?;
    let pgoff = hex(after("pgoff")?)?;
    let mode = toks
        .iter()
        .position(|t| *t == "shared" || *t == "private")?;
    let flags = toks.get(mode + 1).copied().unwrap_or("");
    let write = flags != "address" && flags.split('|').any(|f| f == "WRITE");
    let max_at = toks.iter().position(|t| *t == "max_pgoff")?;
    let result = toks.get(max_at + 2).copied().unwrap_or("").to_string();
    Some(PmdFault {
        ino,
        write,
        address,
        pgoff,
        result,
    })
}

/// Enabled tracepoints in a private instance; `finish` disables them and returns the
/// lines they produced.
pub struct Trace {
    dir: PathBuf,
    events: Vec<String>,
}

impl Trace {
    /// Enable `events` ("subsystem/name") in a fresh private instance. Err says why
    /// tracing is unusable.
    pub fn start(events: &[&str]) -> Result<Trace, String> {
        let root = Path::new(TRACEFS);
        if !root.join("events").exists() {
            return Err(format!("{TRACEFS}/events missing (tracefs not mounted?)"));
        }
        let dir = root.join(INSTANCE);
        if !dir.exists() {
            std::fs::create_dir(&dir)
                .map_err(|e| format!("mkdir {}: {}", dir.display(), crate::error::describe(&e)))?;
        }
        let write = |rel: &str, what: &str| {
            std::fs::write(dir.join(rel), what)
                .map_err(|e| format!("{rel}: {}", crate::error::describe(&e)))
        };
        write("events/enable", "0")?;
        write("trace", "")?; // truncating the file clears the buffer
        write("tracing_on", "1")?;
        for ev in events {
            write(&format!("events/{ev}/enable"), "1")?;
        }
        Ok(Trace {
            dir,
            events: events.iter().map(|e| e.to_string()).collect(),
        })
    }

    /// Disable the events and return the trace lines.
    pub fn finish(self) -> Result<Vec<String>, String> {
        for ev in &self.events {
            let _ = std::fs::write(self.dir.join(format!("events/{ev}/enable")), "0");
        }
        let text = std::fs::read_to_string(self.dir.join("trace"))
            .map_err(|e| format!("trace: {}", crate::error::describe(&e)))?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(String::from)
            .collect())
    }
}

/// The fs_dax PMD fault tracepoint.
pub struct PmdTrace(Trace);

impl PmdTrace {
    pub fn start() -> Result<PmdTrace, String> {
        Trace::start(&[PMD_EVENT]).map(PmdTrace)
    }

    pub fn finish(self) -> Result<Vec<PmdFault>, String> {
        Ok(self
            .0
            .finish()?
            .iter()
            .filter_map(|l| parse_line(l))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nopage_and_fallback() {
        let l = " pmem-guest-test-88 [001] ..... 41.1: dax_pmd_fault_done: dev 259:0 ino 0xc \
                 shared WRITE|ALLOW_RETRY|KILLABLE|USER address 0x7f5c00200000 vm_start \
                 0x7f5c00000000 vm_end 0x7f5c00400000 pgoff 0x200 max_pgoff 0x3ff NOPAGE";
        let f = parse_line(l).unwrap();
        assert_eq!(f.ino, 0xc);
        assert!(f.write);
        assert_eq!(f.address, 0x7f5c_0020_0000);
        assert_eq!(f.pgoff, 0x200);
        assert!(f.is_pmd() && !f.is_fallback());

        let l = "x-1 [000] ..... 2.0: dax_pmd_fault_done: dev 259:0 ino 0x10 private \
                 ALLOW_RETRY|KILLABLE|USER address 0x1000 vm_start 0x0 vm_end 0x2000 \
                 pgoff 0x0 max_pgoff 0x1 FALLBACK";
        let f = parse_line(l).unwrap();
        assert!(!f.write);
        assert!(f.is_fallback() && !f.is_pmd());
    }

    #[test]
    fn empty_flags_and_result() {
        let l = "t: dax_pmd_fault_done: dev 259:0 ino 0x1 shared  address 0x0 vm_start 0x0 \
                 vm_end 0x0 pgoff 0x0 max_pgoff 0x0";
        let f = parse_line(l).unwrap();
        assert!(!f.write);
        assert_eq!(f.result, "");
        assert!(parse_line("t: dax_pmd_load_hole: dev 259:0").is_none());
        assert!(parse_line("# tracer: nop").is_none());
    }
}
