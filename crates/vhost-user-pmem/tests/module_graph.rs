//! The daemon's modules form no cycle: no module uses one that uses it back, directly or
//! through others. Each module's dependencies are the `crate::X` and `super::X` paths in its
//! source (for `main.rs`, `vhost_user_pmem::X`; for `lib.rs`, also `X::`); a cycle fails the test with the whole graph,
//! so that the change that made it can see where it closed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The text with `//` comments removed, so that a doc comment naming `crate::x` is no edge.
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first path segment after each `prefix` (`crate::x::..`, `crate::{x, y::z}`).
fn targets(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices(prefix) {
        let before = code[..at].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue; // `foo_crate::`, `std::sync::`
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: split at commas outside nested braces.
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.push(ident(group[start..i].trim()).to_string());
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(group[start..i].trim()).to_string());
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(rest).to_string());
        }
    }
    out
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files: Vec<_> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    let modules: BTreeSet<String> = files
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut g = Graph::new();
    for path in &files {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = code(&std::fs::read_to_string(path).unwrap());
        let mut deps = BTreeSet::new();
        for prefix in ["crate::", "super::", "vhost_user_pmem::"] {
            for t in targets(&text, prefix) {
                // `super::` in a module's own `mod tests` is the module itself; a name that
                // is no module file (`crate::Error`) is an item of lib.rs.
                let t = if modules.contains(&t) {
                    t
                } else if prefix == "super::" {
                    continue;
                } else {
                    "lib".to_string()
                };
                if t != name {
                    deps.insert(t);
                }
            }
        }
        if name == "lib" {
            // The crate root names its own modules without `crate::` (`socket::listen`).
            for m in &modules {
                if m != "lib" && m != "main" && !targets(&text, &format!("{m}::")).is_empty() {
                    deps.insert(m.clone());
                }
            }
        }
        g.insert(name, deps);
    }
    g
}

fn show(g: &Graph) -> String {
    g.iter()
        .map(|(m, deps)| {
            let d: Vec<&str> = deps.iter().map(String::as_str).collect();
            format!("  {m} -> {}\n", d.join(", "))
        })
        .collect()
}

/// One cycle of `g`, if it has one, as the modules along it.
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(
        g: &Graph,
        m: &str,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(m.to_string(), Mark::OnPath);
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            match marks.get(d.as_str()).copied().unwrap_or(Mark::New) {
                Mark::OnPath => {
                    let from = path.iter().position(|p| p == d).unwrap();
                    let mut cycle = path[from..].to_vec();
                    cycle.push(d.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(g, d, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(m.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for m in g.keys() {
        if marks.get(m.as_str()).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(c) = visit(g, m, &mut marks, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_daemons_modules_form_no_cycle() {
    let g = graph();
    assert!(g.len() > 10, "no module files found:\n{}", show(&g));
    if let Some(cycle) = find_cycle(&g) {
        panic!(
            "module cycle: {}\nthe module graph (module -> what it uses):\n{}",
            cycle.join(" -> "),
            show(&g)
        );
    }
    println!("{}", show(&g));
}

#[test]
fn the_reader_finds_edges_and_cycles() {
    let text = code(
        "use crate::{a, b::{c, d}, e::F};\nuse super::g;\n// crate::commented\nlet x = my_crate::h;\nuse std::sync::Mutex;",
    );
    assert_eq!(targets(&text, "crate::"), ["a", "b", "e"]);
    assert_eq!(targets(&text, "super::"), ["g"]);
    assert!(
        targets(&text, "sync::").is_empty(),
        "a path inside another path"
    );
    let mut g = Graph::new();
    for (m, d) in [("a", "b"), ("b", "c"), ("c", "a")] {
        g.entry(m.into()).or_default().insert(d.into());
    }
    assert_eq!(
        find_cycle(&g).unwrap(),
        ["a", "b", "c", "a"].map(String::from)
    );
    g.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&g), None);
}
