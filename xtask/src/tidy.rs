//! `cargo xtask tidy`: the layering rules, read from the sources (no build of payhost needed).
//! Each rule says where a thing may appear; a file that breaks one is named with its line.
//! - every `.rs` file opens with a `//!` doc comment saying what it is for;
//! - SQL (`SELECT`, `INSERT INTO`, `UPDATE … SET`, `DELETE FROM`, `CREATE TABLE`, `PRAGMA`)
//!   only in the store crates (`host/store-*`);
//! - `abi_stable` only in provider-api (the contract) and the test fixtures that imitate other
//!   versions of it;
//! - `axum` and `hyper` only in payhost's HTTP module (`host/payhost/src/http/`) and the CLI;
//! - no `use super::*` (a module says what it takes from its parent).

use std::path::{Path, PathBuf};

/// One broken rule: where, and which rule.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Finding {
    pub(crate) file: PathBuf,
    pub(crate) line: usize,
    pub(crate) rule: &'static str,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.rule)
    }
}

/// A glob import of the parent module (spelled in two parts, so this file does not match it).
const PARENT_GLOB: &str = concat!("use super::", "*");

/// The folders whose sources the rules cover (relative to the workspace root).
const ROOTS: &[&str] = &[
    "host",
    "provider-api",
    "providers",
    "tests",
    "xtask",
    "benches",
    "examples",
];

/// Checks every source under the workspace at `root`; the findings, in file order.
pub(crate) fn check(root: &Path) -> Vec<Finding> {
    let mut files = Vec::new();
    for dir in ROOTS {
        collect(&root.join(dir), &mut files);
    }
    files.sort();
    let mut findings = Vec::new();
    for path in files {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let rel = path.strip_prefix(root).unwrap_or(&path).to_owned();
        findings.extend(check_file(&rel, &text));
    }
    findings
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if name != "target" && name != "node_modules" && !name.starts_with('.') {
                collect(&path, out);
            }
        } else if name.ends_with(".rs") || name == "Cargo.toml" {
            out.push(path);
        }
    }
}

/// The rules one file breaks (`rel`: its path from the workspace root, `/`-separated).
pub(crate) fn check_file(rel: &Path, text: &str) -> Vec<Finding> {
    let path = rel.to_string_lossy().replace('\\', "/");
    let mut findings = Vec::new();
    let mut found = |line: usize, rule: &'static str| {
        findings.push(Finding {
            file: rel.to_owned(),
            line,
            rule,
        })
    };
    let in_store = path.starts_with("host/store-");
    let may_use_abi = path.starts_with("provider-api/") || path.starts_with("tests/fixtures/");
    let may_use_http = !path.starts_with("host/")
        || path.starts_with("host/payhost/src/http/")
        || path.starts_with("host/cli/")
        || path == "host/payhost/Cargo.toml";
    if path.ends_with("Cargo.toml") {
        for (i, line) in text.lines().enumerate() {
            let key = line.split(['=', '.']).next().unwrap_or("").trim();
            if key == "abi_stable" && !may_use_abi {
                found(
                    i + 1,
                    "abi_stable is provider-api's: depend on payhost-provider-api",
                );
            }
            if (key == "axum" || key == "hyper" || key == "hyper-util") && !may_use_http {
                found(
                    i + 1,
                    "axum and hyper belong to payhost's HTTP module and the CLI",
                );
            }
        }
        return findings;
    }
    if !text.starts_with("//!") {
        found(
            1,
            "a source file opens with a `//!` comment saying what it is for",
        );
    }
    // The rules' own text names what they look for.
    let rules_text = path == "xtask/src/tidy.rs";
    for (i, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") || rules_text {
            continue;
        }
        if code.contains(PARENT_GLOB) {
            found(i + 1, "no `use super::*`: name what the module takes");
        }
        if !may_use_abi && code.contains("abi_stable::") {
            found(
                i + 1,
                "abi_stable is provider-api's: use its envelope re-exports",
            );
        }
        if !may_use_http
            && (code.contains("axum::")
                || code.contains("hyper::")
                || code.contains("hyper_util::"))
        {
            found(
                i + 1,
                "axum and hyper belong to payhost's HTTP module and the CLI",
            );
        }
        if !in_store && path.starts_with("host/") && is_sql(code) {
            found(i + 1, "SQL belongs to the store crates (host/store-*)");
        }
    }
    findings
}

/// Whether a line of code holds an SQL statement in a string.
fn is_sql(code: &str) -> bool {
    let Some(start) = code.find('"') else {
        return false;
    };
    let s = &code[start + 1..];
    let upper = s.trim_start();
    [
        "SELECT ",
        "INSERT INTO ",
        "DELETE FROM ",
        "CREATE TABLE ",
        "PRAGMA ",
        "ALTER TABLE ",
    ]
    .iter()
    .any(|k| upper.starts_with(k))
        || (upper.starts_with("UPDATE ") && upper.contains(" SET "))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{PARENT_GLOB, check_file};

    fn rules(path: &str, text: &str) -> Vec<&'static str> {
        check_file(Path::new(path), text)
            .into_iter()
            .map(|f| f.rule)
            .collect()
    }

    #[test]
    fn each_rule_holds_where_it_applies_and_nowhere_else() {
        let ok = "//! A module.\n";
        assert!(rules("host/core/src/a.rs", ok).is_empty());
        assert_eq!(rules("host/core/src/a.rs", "fn f() {}\n").len(), 1);
        let sql = "//! x\nconst Q: &str = \"SELECT id FROM payments\";\n";
        assert_eq!(rules("host/payhost/src/engine/a.rs", sql).len(), 1);
        assert!(rules("host/store-sqlite/src/a.rs", sql).is_empty());
        let upd = "//! x\nlet q = \"UPDATE attempts SET state = 1\";\n";
        assert_eq!(rules("host/payhost/src/a.rs", upd).len(), 1);
        let axum = "//! x\nuse axum::Router;\n";
        assert!(rules("host/payhost/src/http/a.rs", axum).is_empty());
        assert!(rules("host/cli/src/main.rs", axum).is_empty());
        assert_eq!(rules("host/payhost/src/engine/a.rs", axum).len(), 1);
        let abi = "//! x\nuse abi_stable::std_types::RString;\n";
        assert!(rules("provider-api/src/abi.rs", abi).is_empty());
        assert_eq!(rules("host/plugins/src/a.rs", abi).len(), 1);
        let glob = format!("//! x\nmod tests {{\n    {PARENT_GLOB};\n}}\n");
        assert_eq!(rules("tests/tests/e2e/a.rs", &glob).len(), 1);
        let comment = "//! abi_stable:: and use super::* and \"SELECT x\" in a comment\n";
        assert!(rules("host/plugins/src/a.rs", comment).is_empty());
        let manifest = "[dependencies]\nabi_stable.workspace = true\naxum = \"0.8\"\n";
        assert_eq!(rules("host/plugins/Cargo.toml", manifest).len(), 2);
        assert!(rules("host/payhost/Cargo.toml", "axum.workspace = true\n").is_empty());
    }
}
