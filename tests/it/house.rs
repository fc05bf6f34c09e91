//! The house rules ARCHITECTURE.md states, checked on the tree: no product file over 800
//! lines of code (its `#[cfg(test)]` module aside), and no product function over 80 lines
//! without a `// Long by design:` line saying why. Product code is every crate's `src/` but
//! the benchmarks' (`edgetally-bench`), and xtask.

use std::path::{Path, PathBuf};

const MAX_FILE: usize = 800;
const MAX_FN: usize = 80;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The name of the function a line opens, if it opens one with a body.
fn opens_fn(line: &str) -> Option<&str> {
    let t = line.trim_start();
    let mut rest = t;
    for prefix in [
        "pub(crate) ",
        "pub(super) ",
        "pub ",
        "async ",
        "const ",
        "unsafe ",
    ] {
        rest = rest.strip_prefix(prefix).unwrap_or(rest);
        rest = rest.strip_prefix(prefix).unwrap_or(rest);
    }
    let name = rest.strip_prefix("fn ")?;
    if t.trim_end().ends_with(';') {
        return None;
    }
    name.split(['(', '<']).next()
}

#[test]
fn no_product_file_or_function_outgrows_the_house_rules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root.join("crates"))
        .expect("crates/")
        .flatten()
    {
        if entry.file_name() != "edgetally-bench" {
            sources(&entry.path().join("src"), &mut files);
        }
    }
    assert!(files.len() > 50, "the product sources were not found");
    let mut broken = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        let end = lines
            .iter()
            .position(|l| l.starts_with("#[cfg(test)]"))
            .unwrap_or(lines.len());
        let name = f.strip_prefix(&root).unwrap_or(f).display().to_string();
        if end > MAX_FILE {
            broken.push(format!("{name}: {end} lines of product code"));
        }
        for (i, line) in lines[..end].iter().enumerate() {
            let Some(fn_name) = opens_fn(line) else {
                continue;
            };
            // A body on the signature's line (`fn show(&self) -> String { … }`) is one line.
            let (open, close) = (line.matches('{').count(), line.matches('}').count());
            if open > 0 && open == close {
                continue;
            }
            let indent = line.len() - line.trim_start().len();
            let close = format!("{}}}", " ".repeat(indent));
            let Some(len) = lines[i + 1..end]
                .iter()
                .position(|l| l.starts_with(&close) && l.len() - l.trim_start().len() == indent)
            else {
                continue;
            };
            if len + 2 <= MAX_FN {
                continue;
            }
            let reasoned = lines[..i]
                .iter()
                .rev()
                .take_while(|l| {
                    let t = l.trim_start();
                    t.starts_with("//") || t.starts_with("#[")
                })
                .any(|l| l.contains("// Long by design:"));
            if !reasoned {
                broken.push(format!(
                    "{name}:{}: fn {fn_name} is {} lines with no `// Long by design:` reason",
                    i + 1,
                    len + 2
                ));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}
