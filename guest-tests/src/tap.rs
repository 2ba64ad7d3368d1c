//! The TAP stream. Everything the binary reports goes through here so that numbering,
//! escaping and the final plan stay consistent.

use std::io::{Stdout, Write};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// Passed vacuously: the thing to test is absent (TAP `# SKIP`).
    Skip(String),
    Fail(String),
}

/// `#` would start a directive and a newline would end the line early, so neither may
/// appear in a name.
fn clean_name(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '#' => '_',
            '\n' | '\r' => ' ',
            c => c,
        })
        .collect()
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn format_result(n: usize, name: &str, outcome: &Outcome) -> String {
    let name = clean_name(name);
    match outcome {
        Outcome::Pass => format!("ok {n} - {name}"),
        Outcome::Skip(why) => format!("ok {n} - {name} # SKIP {}", one_line(why)),
        Outcome::Fail(why) => format!("not ok {n} - {name} # {}", one_line(why)),
    }
}

/// Each line of `text` as a TAP diagnostic.
pub fn format_diag(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.is_empty() {
            out.push_str("#\n");
        } else {
            out.push_str("# ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

pub fn format_plan(count: usize) -> String {
    format!("1..{count}")
}

/// Counts results and writes the stream, flushing every line: the guest may be crashed
/// or powered off at any moment after a line is printed, and the serial console is the
/// only record.
pub struct Tap<W: Write = Stdout> {
    out: W,
    count: usize,
    failed: usize,
}

impl Tap<Stdout> {
    pub fn stdout() -> Self {
        Tap::new(std::io::stdout())
    }
}

impl<W: Write> Tap<W> {
    pub fn new(out: W) -> Self {
        Tap {
            out,
            count: 0,
            failed: 0,
        }
    }

    /// Number the next result will get.
    pub fn next_number(&self) -> usize {
        self.count + 1
    }

    pub fn result(&mut self, name: &str, outcome: &Outcome) {
        self.count += 1;
        if matches!(outcome, Outcome::Fail(_)) {
            self.failed += 1;
        }
        let line = format!("{}\n", format_result(self.count, name, outcome));
        self.emit(&line);
    }

    pub fn diag(&mut self, text: &str) {
        self.emit(&format_diag(text));
    }

    /// A line outside TAP's grammar (VUP-HOSTCHECK, VUP-METRIC): TAP consumers ignore
    /// it, and the host runner greps for it at the start of a line.
    pub fn raw(&mut self, line: &str) {
        self.emit(&format!("{line}\n"));
    }

    pub fn failed(&self) -> usize {
        self.failed
    }

    pub fn finish(&mut self) {
        let plan = format!("{}\n", format_plan(self.count));
        self.emit(&plan);
    }

    #[cfg(test)]
    fn into_inner(self) -> W {
        self.out
    }

    fn emit(&mut self, text: &str) {
        // Nothing useful can be done if the console is gone.
        let _ = self.out.write_all(text.as_bytes());
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines() {
        assert_eq!(
            format_result(1, "mount_dax", &Outcome::Pass),
            "ok 1 - mount_dax"
        );
        assert_eq!(
            format_result(2, "write_fsync", &Outcome::Fail("fsync: EIO".into())),
            "not ok 2 - write_fsync # fsync: EIO"
        );
        assert_eq!(
            format_result(3, "deep_flush", &Outcome::Skip("no deep_flush file".into())),
            "ok 3 - deep_flush # SKIP no deep_flush file"
        );
    }

    #[test]
    fn names_and_reasons_stay_on_one_line() {
        assert_eq!(
            format_result(4, "a#b\nc", &Outcome::Fail("first\n\n  second \n".into())),
            "not ok 4 - a_b c # first; second"
        );
    }

    #[test]
    fn diagnostics_prefix_every_line() {
        assert_eq!(format_diag("one\ntwo"), "# one\n# two\n");
        assert_eq!(format_diag("a\n\nb\n"), "# a\n#\n# b\n");
    }

    #[test]
    fn plan_and_counting() {
        assert_eq!(format_plan(7), "1..7");
        let mut t = Tap::new(Vec::new());
        assert_eq!(t.next_number(), 1);
        t.result("x", &Outcome::Pass);
        t.diag("note");
        t.result("y", &Outcome::Fail("no".into()));
        t.raw("VUP-METRIC op=x");
        t.result("z", &Outcome::Skip("absent".into()));
        assert_eq!(t.next_number(), 4);
        assert_eq!(t.failed(), 1);
        t.finish();
        assert_eq!(
            String::from_utf8(t.into_inner()).unwrap(),
            "ok 1 - x\n# note\nnot ok 2 - y # no\nVUP-METRIC op=x\nok 3 - z # SKIP absent\n1..3\n"
        );
    }
}
