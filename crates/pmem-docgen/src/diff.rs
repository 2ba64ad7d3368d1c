//! A small line diff for `--check`'s report: enough to show which lines of a committed file
//! went stale, in the familiar unified form, without a diff crate for ~1000-line files.

/// Lines of context around each change.
const CONTEXT: usize = 2;
/// At most this many lines of diff per file: a wholly different file needs no full listing.
const MAX_LINES: usize = 60;
/// Above this many cells (old lines × new lines) the LCS table is not built; the report then
/// shows the first differing line only.
const MAX_CELLS: usize = 4_000_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Same,
    Del,
    Add,
}

/// A unified diff of `old` (the committed file) against `new` (the rendered one), headed with
/// `path`, or an empty string when they are equal line for line.
pub fn unified(path: &str, old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut out = format!("--- {path} (committed)\n+++ {path} (rendered now)\n");
    let Some(ops) = script(&a, &b) else {
        let i = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        out.push_str(&format!(
            "@@ line {} (too large to diff in full) @@\n-{}\n+{}\n",
            i + 1,
            a.get(i).unwrap_or(&"<end of file>"),
            b.get(i).unwrap_or(&"<end of file>")
        ));
        return out;
    };
    if ops.iter().all(|(op, _, _)| *op == Op::Same) {
        // Equal lines, so only line endings differ (a missing final newline, CRLF).
        out.push_str("@@ the lines are equal; the line endings differ @@\n");
        return out;
    }
    let mut written = 0;
    let mut i = 0;
    while i < ops.len() {
        if ops[i].0 == Op::Same {
            i += 1;
            continue;
        }
        // A hunk: from CONTEXT lines before this change to CONTEXT lines after the last
        // change that is at most 2 * CONTEXT unchanged lines further on.
        let start = i.saturating_sub(CONTEXT);
        let mut end = i;
        let mut j = i;
        while j < ops.len() {
            if ops[j].0 != Op::Same {
                end = j;
            } else if j - end > 2 * CONTEXT {
                break;
            }
            j += 1;
        }
        let stop = (end + 1 + CONTEXT).min(ops.len());
        let (_, a0, b0) = ops[start];
        out.push_str(&format!("@@ -{} +{} @@\n", a0 + 1, b0 + 1));
        for &(op, ai, bi) in &ops[start..stop] {
            if written == MAX_LINES {
                out.push_str("... (more differences not shown)\n");
                return out;
            }
            let line = match op {
                Op::Same => format!(" {}\n", a[ai]),
                Op::Del => format!("-{}\n", a[ai]),
                Op::Add => format!("+{}\n", b[bi]),
            };
            out.push_str(&line);
            written += 1;
        }
        i = stop;
    }
    out
}

/// The edit script from `a` to `b` along a longest common subsequence, each step with the
/// indices it stands at in `a` and `b`; `None` if the inputs are too large for the table.
fn script(a: &[&str], b: &[&str]) -> Option<Vec<(Op, usize, usize)>> {
    let (n, m) = (a.len(), b.len());
    if (n + 1).checked_mul(m + 1)? > MAX_CELLS {
        return None;
    }
    // lcs[i][j]: the LCS length of a[i..] and b[j..], in one flat table.
    let w = m + 1;
    let mut lcs = vec![0u32; (n + 1) * w];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i * w + j] = if a[i] == b[j] {
                lcs[(i + 1) * w + j + 1] + 1
            } else {
                lcs[(i + 1) * w + j].max(lcs[i * w + j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut ops = Vec::with_capacity(n + m);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            ops.push((Op::Same, i, j));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[(i + 1) * w + j] >= lcs[i * w + j + 1]) {
            // On a tie the removal goes first, as diff(1) shows it.
            ops.push((Op::Del, i, j));
            i += 1;
        } else {
            ops.push((Op::Add, i, j));
            j += 1;
        }
    }
    Some(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_changed_line_shows_with_context() {
        let old = "a\nb\nc\nd\ne\nf\ng\n";
        let new = "a\nb\nc\nD\ne\nf\ng\n";
        let d = unified("f", old, new);
        assert_eq!(
            d,
            "--- f (committed)\n+++ f (rendered now)\n@@ -2 +2 @@\n b\n c\n-d\n+D\n e\n f\n"
        );
    }

    #[test]
    fn additions_and_removals_at_the_ends() {
        let d = unified("f", "x\na\n", "a\ny\n");
        assert!(d.contains("-x\n"), "{d}");
        assert!(d.contains("+y\n"), "{d}");
        assert!(d.contains(" a\n"), "{d}");
    }

    #[test]
    fn far_apart_changes_make_two_hunks() {
        let old: String = (0..20).map(|i| format!("{i}\n")).collect();
        let new = old.replace("3\n", "three\n").replace("15\n", "fifteen\n");
        let d = unified("f", &old, &new);
        assert_eq!(d.matches("@@ -").count(), 2, "{d}");
    }

    #[test]
    fn only_line_endings_differ() {
        let d = unified("f", "a\nb", "a\nb\n");
        assert!(d.contains("line endings"), "{d}");
    }

    #[test]
    fn long_diffs_are_cut() {
        let old: String = (0..200).map(|i| format!("{i}\n")).collect();
        let new: String = (0..200).map(|i| format!("x{i}\n")).collect();
        let d = unified("f", &old, &new);
        assert!(d.ends_with("... (more differences not shown)\n"), "{d}");
        assert!(d.lines().count() < MAX_LINES + 10);
    }
}
