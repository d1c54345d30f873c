//! The layers of `src/` (ARCHITECTURE.md, "Layers"): a module uses modules of lower layers
//! only, so no import circle can form between them. Read from the sources: every
//! `crate::<module>` (and, in the binary, `rostersync::<module>`) outside test modules is an
//! arrow from the file's top-level module to that one.
//!
//! The arrows that still run upwards are listed in [`KNOWN_UPWARD`] with what they take; the
//! test fails on any other (a new upward import) and on a listed one that is gone (so the list
//! only shrinks).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module of `src/` and its layer, bottom first.
const LAYERS: &[(&str, u8)] = &[
    // Helpers: no module of the crate below them.
    ("text", 0),
    ("retry", 0),
    ("metrics", 0),
    ("logging", 0),
    ("redact", 0),
    // The domain's vocabulary.
    ("model", 1),
    // The two remote systems and the local store, each on the model only.
    ("graph", 2),
    ("lms", 2),
    ("store", 2),
    // The mapping table (Graph user -> record), compiled while the config loads.
    ("mapping", 3),
    ("config", 4),
    ("sync", 5),
    // What runs the sync and reports on it.
    ("alert", 6),
    ("webhook", 6),
    ("ops", 6),
    ("app", 7),
    ("http", 8),
    ("output", 8),
    ("serve", 9),
    ("demo", 10),
    ("cli", 11),
    ("main", 11),
];

/// Imports that still run upwards (from, to, what is taken). None today: an entry here is a
/// debt to pay back, and the test fails once it is paid so that the list only shrinks.
const KNOWN_UPWARD: &[(&str, &str, &str)] = &[];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`src/sync/worker.rs` → `sync`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

/// The code of a file without its inline test modules (`#[cfg(test)]` then `mod x {`, to its
/// closing brace) and without comment lines.
fn code(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim();
        let next = lines[i + 1..].iter().position(|l| !l.trim().is_empty());
        if t == "#[cfg(test)]" {
            if let Some(n) = next.map(|n| i + 1 + n) {
                let m = lines[n].trim_start();
                if m.starts_with("mod ") && m.trim_end().ends_with('{') {
                    // Skip to the brace that closes the module.
                    let mut depth = 0i64;
                    let mut j = n;
                    while j < lines.len() {
                        depth += lines[j].matches('{').count() as i64;
                        depth -= lines[j].matches('}').count() as i64;
                        j += 1;
                        if depth <= 0 {
                            break;
                        }
                    }
                    i = j;
                    continue;
                }
            }
        }
        if !t.starts_with("//") {
            out.push_str(lines[i]);
            out.push('\n');
        }
        i += 1;
    }
    out
}

/// Files that are test modules as a whole (`#[cfg(test)] mod tests;` beside a `mod.rs`).
fn is_test_file(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "tests.rs")
}

/// The modules a piece of code names as `crate::x` or `rostersync::x`, also inside
/// `use crate::{x, y::z}`.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for prefix in ["crate::", "rostersync::"] {
        for (at, _) in code.match_indices(prefix) {
            // `some_crate::` is another crate, not this one.
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let rest = &code[at + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    out.insert(name);
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                out.insert(name);
            }
        }
    }
    out
}

/// Every arrow between two top-level modules, with one file that draws it.
fn arrows() -> BTreeMap<(String, String), String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out = BTreeMap::new();
    for file in files {
        let from = module_of(&src, &file);
        if from == "lib" || from == "fuzz" || is_test_file(&file) {
            // The crate root only declares the modules; `fuzz` and `tests.rs` are test modules.
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read a source file");
        for to in named_modules(&code(&text)) {
            if to != from && layer(&to).is_some() {
                out.entry((from.clone(), to))
                    .or_insert_with(|| file.display().to_string());
            }
        }
    }
    out
}

#[test]
fn every_module_of_src_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let missing: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(&src, f))
        .filter(|m| m != "lib" && m != "fuzz" && layer(m).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "give these modules a layer in LAYERS (and ARCHITECTURE.md): {missing:?}"
    );
}

#[test]
fn imports_run_down_the_layers() {
    let arrows = arrows();
    let upward: BTreeMap<(String, String), String> = arrows
        .into_iter()
        .filter(|((from, to), _)| layer(to) >= layer(from))
        .collect();
    let known: BTreeSet<(String, String)> = KNOWN_UPWARD
        .iter()
        .map(|(f, t, _)| (f.to_string(), t.to_string()))
        .collect();
    let new: Vec<String> = upward
        .iter()
        .filter(|(k, _)| !known.contains(*k))
        .map(|((f, t), file)| format!("{f} -> {t} ({file})"))
        .collect();
    assert!(
        new.is_empty(),
        "imports against the layers (a module may use lower layers only; see ARCHITECTURE.md): {new:#?}"
    );
    let gone: Vec<&(String, String)> = known.iter().filter(|k| !upward.contains_key(*k)).collect();
    assert!(
        gone.is_empty(),
        "no longer imported: delete from KNOWN_UPWARD (and ARCHITECTURE.md): {gone:?}"
    );
}

#[test]
fn the_import_reader_sees_grouped_and_qualified_paths_and_skips_tests() {
    let code = code(
        "use crate::{graph::GraphClient, store};\nfn f() { crate::sync::decide(); other_crate::x(); }\n// crate::alert in a comment\n#[cfg(test)]\nmod tests {\n    fn g() {\n        crate::serve::x();\n    }\n}\nfn after() { crate::retry::y(); }\n",
    );
    let got: Vec<String> = named_modules(&code).into_iter().collect();
    assert_eq!(got, ["graph", "retry", "store", "sync"]);
}
