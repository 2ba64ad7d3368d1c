//! JUnit XML, which CI systems read: one `testsuite` per boot with a `testcase` per TAP
//! result, and one `testsuite` for the runner's own checks (each failed check a failure).

use crate::tap::{Boot, Directive};

/// Text for an XML attribute or element (also the libvirt domain XML's values).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 has no way to write other control characters.
            c if c.is_control() && !matches!(c, '\n' | '\t' | '\r') => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// The document. `device` names the suites (`vhost-user boot 1`); `seconds` is the run's
/// wall time; `failures` are the runner's failed checks.
pub fn render(device: &str, boots: &[Boot], failures: &[String], seconds: f64) -> String {
    let mut suites = String::new();
    let (mut tests, mut failed, mut skipped) = (0, 0, 0);
    for b in boots {
        let mut cases = String::new();
        let (mut bf, mut bs) = (0, 0);
        for r in &b.results {
            let name = if r.name.is_empty() {
                format!("test {}", r.number.unwrap_or(0))
            } else {
                r.name.clone()
            };
            cases.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}\"",
                escape(device),
                escape(&name)
            ));
            let body = r.diagnostics.join("\n");
            if !r.passed() {
                bf += 1;
                cases.push_str(&format!(
                    ">\n      <failure message=\"not ok\">{}</failure>\n    </testcase>\n",
                    escape(&body)
                ));
            } else if let Directive::Skip(why) = &r.directive {
                bs += 1;
                cases.push_str(&format!(
                    ">\n      <skipped message=\"{}\"/>\n    </testcase>\n",
                    escape(why)
                ));
            } else {
                cases.push_str("/>\n");
            }
        }
        tests += b.results.len();
        failed += bf;
        skipped += bs;
        suites.push_str(&format!(
            "  <testsuite name=\"{} boot {}\" tests=\"{}\" failures=\"{bf}\" skipped=\"{bs}\">\n{cases}  </testsuite>\n",
            escape(device),
            b.number,
            b.results.len()
        ));
    }
    let runner_cases = if failures.is_empty() {
        "    <testcase classname=\"vmrun\" name=\"runner checks\"/>\n".to_string()
    } else {
        failures
            .iter()
            .map(|f| {
                format!(
                    "    <testcase classname=\"vmrun\" name=\"runner check\">\n      <failure message=\"{}\"/>\n    </testcase>\n",
                    escape(f)
                )
            })
            .collect()
    };
    let rn = failures.len().max(1);
    tests += rn;
    failed += failures.len();
    suites.push_str(&format!(
        "  <testsuite name=\"{} runner checks\" tests=\"{rn}\" failures=\"{}\" skipped=\"0\">\n{runner_cases}  </testsuite>\n",
        escape(device),
        failures.len()
    ));
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"vmrun {}\" tests=\"{tests}\" failures=\"{failed}\" skipped=\"{skipped}\" time=\"{seconds:.1}\">\n{suites}</testsuites>\n",
        escape(device)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::split_boots;

    #[test]
    fn results_failures_and_skips() {
        let boots = split_boots(
            "VUP-BEGIN\n1..3\nok 1 - a<b\nnot ok 2 - b\n# want \"x\" & y\nok 3 - c # SKIP none\nVUP-END rc=0\n",
        );
        let x = render(
            "vhost-user",
            &boots,
            &["QEMU exited with status 1".into()],
            12.34,
        );
        assert!(x.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"vmrun vhost-user\" tests=\"4\" failures=\"2\" skipped=\"1\" time=\"12.3\">"), "{x}");
        assert!(
            x.contains("<testcase classname=\"vhost-user\" name=\"a&lt;b\"/>"),
            "{x}"
        );
        assert!(
            x.contains("<failure message=\"not ok\">want &quot;x&quot; &amp; y</failure>"),
            "{x}"
        );
        assert!(x.contains("<skipped message=\"none\"/>"), "{x}");
        assert!(
            x.contains("<testsuite name=\"vhost-user runner checks\" tests=\"1\" failures=\"1\""),
            "{x}"
        );
        assert!(
            x.contains("<failure message=\"QEMU exited with status 1\"/>"),
            "{x}"
        );
        assert_eq!(
            x.matches("<testsuite ").count(),
            x.matches("</testsuite>").count()
        );
    }

    #[test]
    fn a_clean_run_has_one_passing_runner_case() {
        let x = render("builtin", &[], &[], 1.0);
        assert!(x.contains("tests=\"1\" failures=\"0\""), "{x}");
        assert!(x.contains("name=\"runner checks\"/>"), "{x}");
        assert_eq!(escape("\u{1}a"), "?a");
    }
}
