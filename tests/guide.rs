//! Keeps the user guide (`docs/guide/`) in step with the code: every
//! settings variable is documented in the getting-started chapter, every
//! error code in the troubleshooting chapter, and every chapter is both in
//! `SUMMARY.md` and compiled as doc tests through `src/guide.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chapter_dir() -> PathBuf {
    root().join("docs/guide/src")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The codes of `Error::code()`, parsed from its `=> "code"` arms.
fn error_codes() -> Vec<String> {
    let src = read(&root().join("core/src/error.rs"));
    let start = src
        .find("pub fn code(&self) -> &'static str")
        .expect("Error::code in core/src/error.rs");
    let body = &src[start..];
    let end = body[1..].find("pub fn ").map_or(body.len(), |i| i + 1);
    let body = &body[..end];
    let mut codes = Vec::new();
    let mut rest = body;
    while let Some(i) = rest.find("=> \"") {
        let after = &rest[i + 4..];
        let close = after.find('"').expect("closing quote");
        codes.push(after[..close].to_owned());
        rest = &after[close..];
    }
    codes
}

/// The `.md` files a `SUMMARY.md` links to, in order.
fn summary_links(summary: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut rest = summary;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let close = after.find(')').expect("closing parenthesis");
        let target = &after[..close];
        if target.ends_with(".md") {
            links.push(target.to_owned());
        }
        rest = &after[close..];
    }
    links
}

#[test]
fn getting_started_documents_every_settings_variable() {
    let chapter = read(&chapter_dir().join("getting-started.md"));
    let missing: Vec<&str> = switchyard::settings::VARIABLES
        .iter()
        .map(|v| v.name)
        .filter(|name| !chapter.contains(&format!("| `{name}` |")))
        .collect();
    assert!(
        switchyard::settings::VARIABLES.len() >= 20,
        "settings::VARIABLES looks truncated"
    );
    assert!(
        missing.is_empty(),
        "docs/guide/src/getting-started.md has no table row (| `NAME` | default | allowed | …) for {missing:?}"
    );
}

#[test]
fn troubleshooting_explains_every_error_code() {
    let codes = error_codes();
    assert!(
        codes.len() >= 15 && codes.iter().any(|c| c == "invalid_config"),
        "could not parse Error::code in core/src/error.rs: {codes:?}"
    );
    let chapter = read(&chapter_dir().join("troubleshooting.md"));
    let missing: Vec<&String> = codes
        .iter()
        .filter(|code| !chapter.contains(&format!("| `{code}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/guide/src/troubleshooting.md has no row (| `code` | meaning | what to do |) for {missing:?}"
    );
}

#[test]
fn summary_lists_every_chapter_and_every_chapter_is_a_doc_test() {
    let dir = chapter_dir();
    let summary = read(&dir.join("SUMMARY.md"));
    let linked: Vec<String> = summary_links(&summary);
    let linked_set: BTreeSet<&str> = linked.iter().map(String::as_str).collect();
    assert_eq!(linked.len(), linked_set.len(), "SUMMARY.md links a chapter twice");

    let files: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("docs/guide/src")
        .map(|e| e.expect("directory entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md") && name != "SUMMARY.md")
        .collect();
    assert!(files.len() >= 9, "chapters missing from docs/guide/src: {files:?}");
    let unlisted: Vec<&String> = files.iter().filter(|f| !linked_set.contains(f.as_str())).collect();
    assert!(unlisted.is_empty(), "SUMMARY.md does not list {unlisted:?}");
    let dangling: Vec<&&str> = linked_set.iter().filter(|l| !files.contains(**l)).collect();
    assert!(dangling.is_empty(), "SUMMARY.md links missing files {dangling:?}");

    let guide_rs = read(&root().join("src/guide.rs"));
    let not_compiled: Vec<&String> = files
        .iter()
        .filter(|f| !guide_rs.contains(&format!("include_str!(\"../docs/guide/src/{f}\")")))
        .collect();
    assert!(
        not_compiled.is_empty(),
        "src/guide.rs does not include {not_compiled:?} (its samples would not be tested)"
    );
    let lib = read(&root().join("src/lib.rs"));
    assert!(
        lib.contains("#[cfg(doctest)]\nmod guide;"),
        "src/lib.rs must declare `#[cfg(doctest)] mod guide;`"
    );

    let book = read(&root().join("docs/guide/book.toml"));
    assert!(
        book.contains("[book]") && book.contains("src = \"src\""),
        "docs/guide/book.toml"
    );
}
