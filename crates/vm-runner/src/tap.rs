//! The guest binary's output, split into boots: every line between `VUP-BEGIN` and
//! `VUP-END rc=N` belongs to one boot, as TAP results, `VUP-METRIC` lines (benchmark figures)
//! and `VUP-HOSTCHECK` lines (data the host must find in the image).

/// One TAP result line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapResult {
    pub ok: bool,
    pub number: Option<usize>,
    pub name: String,
    pub directive: Directive,
    /// The `#` diagnostic lines that followed it, without the `# `.
    pub diagnostics: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directive {
    None,
    Skip(String),
    Todo(String),
}

impl TapResult {
    /// Whether the result counts as passed: `ok`, or a `not ok` marked TODO.
    pub fn passed(&self) -> bool {
        self.ok || matches!(self.directive, Directive::Todo(_))
    }
}

/// How a boot's binary ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEnd {
    /// `VUP-END rc=N`.
    Rc(i32),
    /// `VUP-END` with an rc that is not a number.
    BadRc,
    /// No `VUP-END`: the guest crashed, was killed, or hangs.
    Missing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    /// 1 for the first boot.
    pub number: usize,
    pub end: BootEnd,
    pub plan: Option<usize>,
    pub results: Vec<TapResult>,
    /// Every line of the boot that is not a VUP-METRIC or VUP-HOSTCHECK line.
    pub tap_lines: Vec<String>,
    pub metrics: Vec<String>,
    pub hostchecks: Vec<String>,
}

impl Boot {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.passed()).count()
    }

    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }
}

/// Parses `ok 3 - name # SKIP why` (the number, the dash and the directive are optional).
pub fn parse_result(line: &str) -> Option<TapResult> {
    let (ok, rest) = if let Some(r) = line.strip_prefix("not ok") {
        (false, r)
    } else if let Some(r) = line.strip_prefix("ok") {
        (true, r)
    } else {
        return None;
    };
    if !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    let rest = rest.trim_start();
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let number = rest[..digits].parse().ok();
    let rest = rest[digits..].trim_start();
    let rest = rest.strip_prefix("- ").unwrap_or(rest);
    let (name, directive) = match rest
        .find(" # ")
        .or_else(|| rest.strip_prefix("# ").map(|_| 0))
    {
        Some(i) => {
            let d = rest[i..]
                .trim_start_matches(' ')
                .trim_start_matches('#')
                .trim();
            let upper = d.to_ascii_uppercase();
            let reason = |n: usize| d[n..].trim().to_string();
            let directive = if upper.starts_with("SKIP") {
                Directive::Skip(reason(4))
            } else if upper.starts_with("TODO") {
                Directive::Todo(reason(4))
            } else {
                Directive::None
            };
            (rest[..i].trim(), directive)
        }
        None => (rest.trim(), Directive::None),
    };
    Some(TapResult {
        ok,
        number,
        name: name.to_string(),
        directive,
        diagnostics: Vec::new(),
    })
}

/// Splits the guest's output into boots.
pub fn split_boots(text: &str) -> Vec<Boot> {
    let mut boots: Vec<Boot> = Vec::new();
    let mut open = false;
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        if line.starts_with("VUP-BEGIN") {
            boots.push(Boot {
                number: boots.len() + 1,
                end: BootEnd::Missing,
                plan: None,
                results: Vec::new(),
                tap_lines: Vec::new(),
                metrics: Vec::new(),
                hostchecks: Vec::new(),
            });
            open = true;
            continue;
        }
        if !open {
            continue;
        }
        let boot = boots.last_mut().expect("a boot is open");
        if let Some(rc) = line.strip_prefix("VUP-END rc=") {
            boot.end = rc
                .split_whitespace()
                .next()
                .and_then(|r| r.parse().ok())
                .map_or(BootEnd::BadRc, BootEnd::Rc);
            open = false;
            continue;
        }
        if line.starts_with("VUP-METRIC ") {
            boot.metrics.push(line.to_string());
            continue;
        }
        if line.starts_with("VUP-HOSTCHECK ") {
            boot.hostchecks.push(line.to_string());
            continue;
        }
        boot.tap_lines.push(line.to_string());
        if let Some(r) = parse_result(line) {
            boot.results.push(r);
        } else if let Some(plan) = line.strip_prefix("1..") {
            let digits: String = plan.chars().take_while(char::is_ascii_digit).collect();
            boot.plan = digits.parse().ok();
        } else if let Some(d) = line.strip_prefix('#') {
            if let Some(last) = boot.results.last_mut() {
                last.diagnostics.push(d.trim_start().to_string());
            }
        }
    }
    boots
}

/// tap.txt: every boot's TAP lines, later boots behind a `# --- boot N ---` line.
pub fn tap_text(boots: &[Boot]) -> String {
    let mut s = String::new();
    for b in boots {
        if b.number > 1 {
            s.push_str(&format!("# --- boot {} ---\n", b.number));
        }
        for l in &b.tap_lines {
            s.push_str(l);
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines() {
        let r = parse_result("ok 3 - fsync_persists").unwrap();
        assert_eq!(
            (r.ok, r.number, r.name.as_str()),
            (true, Some(3), "fsync_persists")
        );
        assert_eq!(r.directive, Directive::None);
        let r = parse_result("ok 4 - ro_region # SKIP the region reads as zeros").unwrap();
        assert_eq!(r.name, "ro_region");
        assert_eq!(
            r.directive,
            Directive::Skip("the region reads as zeros".into())
        );
        let r = parse_result("not ok 5 - known # TODO later").unwrap();
        assert!(!r.ok && r.passed());
        let r = parse_result("not ok 6 - broken").unwrap();
        assert!(!r.passed());
        let r = parse_result("ok").unwrap();
        assert_eq!((r.number, r.name.as_str()), (None, ""));
        assert!(parse_result("okay 1 - x").is_none());
        assert!(parse_result("# ok 1").is_none());
    }

    const TWO_BOOTS: &str = "\
kernel noise
ok 99 - before any boot
VUP-BEGIN boot=1
1..3
ok 1 - a
not ok 2 - b
# expected 1, got 2
VUP-METRIC op=fsync p50_us=300
VUP-HOSTCHECK offset=0 len=4096 sha256=00
ok 3 - c # SKIP no deep_flush
VUP-END rc=1
noise between boots
VUP-BEGIN boot=2
1..2
ok 1 - a
";

    #[test]
    fn boots_are_split_and_counted() {
        let boots = split_boots(TWO_BOOTS);
        assert_eq!(boots.len(), 2);
        let b = &boots[0];
        assert_eq!((b.number, b.end, b.plan), (1, BootEnd::Rc(1), Some(3)));
        assert_eq!((b.passed(), b.failed()), (2, 1));
        assert_eq!(b.results[1].diagnostics, ["expected 1, got 2"]);
        assert_eq!(b.metrics, ["VUP-METRIC op=fsync p50_us=300"]);
        assert_eq!(b.hostchecks.len(), 1);
        let b = &boots[1];
        assert_eq!(
            (b.end, b.plan, b.results.len()),
            (BootEnd::Missing, Some(2), 1)
        );
        let tap = tap_text(&boots);
        assert!(tap.contains("# --- boot 2 ---\n1..2\nok 1 - a\n"), "{tap}");
        assert!(
            !tap.contains("VUP-METRIC") && !tap.contains("before any boot"),
            "{tap}"
        );
    }

    #[test]
    fn a_bad_rc_is_not_a_success() {
        let boots = split_boots("VUP-BEGIN\n1..0\nVUP-END rc=x\n");
        assert_eq!(boots[0].end, BootEnd::BadRc);
        assert!(split_boots("no boots at all\n").is_empty());
    }
}
