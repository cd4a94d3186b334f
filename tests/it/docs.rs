//! The documentation checked against the code: every integration test a
//! document cites still exists, and every relative link points at a file
//! that exists (and, for a `#fragment`, at a heading of that file).
//!
//! Nothing here needs Redis or PostgreSQL. A test is cited as `module::name`,
//! where `module` is a file `tests/it/module.rs`; a path whose first part is
//! not such a file (`seckill::config`, `stock::keys`) is not a citation and
//! is not checked. Citations are read from inline code and plain text, not
//! from fenced code blocks, where a `cargo test` filter may be a prefix.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

/// The documents checked, relative to the repository root, besides every
/// `docs/*.md`.
const DOCUMENTS: &[&str] = &[
    "README.md",
    "ARCHITECTURE.md",
    "loadtest/README.md",
    "nginx/README.md",
    "lua/README.md",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every document to check, as paths relative to the root.
fn documents() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = DOCUMENTS
        .iter()
        .map(PathBuf::from)
        .filter(|p| root().join(p).is_file())
        .collect();
    if let Ok(entries) = std::fs::read_dir(root().join("docs")) {
        let mut docs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "md"))
            .filter_map(|p| p.strip_prefix(root()).ok().map(Path::to_path_buf))
            .collect();
        docs.sort();
        out.extend(docs);
    }
    out
}

/// What a document says, split into the parts this check reads.
#[derive(Debug, Default)]
struct Scan {
    /// `(line, text)` of inline code spans and of plain text outside fenced
    /// code blocks: where test names are looked for.
    prose: Vec<(usize, String)>,
    /// `(line, link text, target)` of every inline link `[text](target)` and
    /// reference definition `[text]: target` outside code.
    links: Vec<(usize, String, String)>,
    /// The GitHub anchors of the document's headings.
    anchors: BTreeSet<String>,
}

fn scan(markdown: &str) -> Scan {
    let mut out = Scan::default();
    let mut fence: Option<String> = None;
    let mut slugs_seen: Vec<String> = Vec::new();
    for (i, line) in markdown.lines().enumerate() {
        let n = i + 1;
        let trimmed = line.trim_start();
        if let Some(marker) = &fence {
            if trimmed.starts_with(marker.as_str()) {
                fence = None;
            }
            continue;
        }
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fence = Some(trimmed[..3].to_string());
            continue;
        }
        if let Some(heading) = trimmed.strip_prefix('#') {
            let text = heading.trim_start_matches('#').trim();
            let base = slug(text);
            let count = slugs_seen.iter().filter(|s| **s == base).count();
            slugs_seen.push(base.clone());
            out.anchors.insert(if count == 0 {
                base
            } else {
                format!("{base}-{count}")
            });
        }
        // Inline code spans alternate with plain text between backticks.
        let mut plain = String::new();
        for (k, part) in line.split('`').enumerate() {
            out.prose.push((n, part.to_string()));
            if k % 2 == 0 {
                plain.push_str(part);
                plain.push(' ');
            } else {
                // Keep the span's text in link texts ([`a::b`](x)).
                plain.push_str(part);
            }
        }
        out.links.extend(
            links_in(&plain)
                .into_iter()
                .map(|(text, target)| (n, text, target)),
        );
        if let Some(rest) = trimmed.strip_prefix('[')
            && let Some((label, after)) = rest.split_once(']')
            && let Some(target) = after.strip_prefix(':')
            && !label.is_empty()
        {
            out.links
                .push((n, label.to_string(), target.trim().to_string()));
        }
    }
    out
}

/// The inline links `[text](target)` of one line (code spans already
/// stripped of their backticks). A title after the target is dropped.
fn links_in(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(close) = rest.find("](") {
        let before = &rest[..close];
        let text = before.rfind('[').map(|o| &before[o + 1..]).unwrap_or("");
        let after = &rest[close + 2..];
        let Some(end) = after.find(')') else { break };
        let target = after[..end].split_whitespace().next().unwrap_or("");
        out.push((text.to_string(), target.to_string()));
        rest = &after[end..];
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces
/// turned into hyphens.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// `module::name` pairs in a piece of text: runs of identifier characters
/// and colons with exactly one `::`, both sides lower-case identifiers.
fn cited_names(text: &str) -> Vec<(String, String)> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter_map(|run| {
            let (module, name) = run.split_once("::")?;
            let ident = |s: &str| {
                s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                    && s.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            };
            (ident(module) && ident(name)).then(|| (module.to_string(), name.to_string()))
        })
        .collect()
}

/// Whether `source` defines `fn name` (followed by `(` or `<`).
fn defines_fn(source: &str, name: &str) -> bool {
    let needle = format!("fn {name}");
    source.match_indices(&needle).any(|(at, _)| {
        matches!(
            source[at + needle.len()..].chars().next(),
            Some('(') | Some('<')
        )
    })
}

/// `path` with `.` and `..` resolved without touching the file system;
/// `None` when it climbs above its start.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Every problem found in the documents, one line each.
fn problems() -> (Vec<String>, usize) {
    let tests_dir = root().join("tests/it");
    let mut problems = Vec::new();
    let mut citations = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(root().join(&doc))
            .unwrap_or_else(|e| panic!("failed to read {}: {e}", doc.display()));
        let scanned = scan(&text);
        let dir = doc.parent().unwrap_or(Path::new(""));

        let mut seen = BTreeSet::new();
        for (line, part) in &scanned.prose {
            for (module, name) in cited_names(part) {
                let file = tests_dir.join(format!("{module}.rs"));
                if module == "main"
                    || !file.is_file()
                    || !seen.insert((*line, module.clone(), name.clone()))
                {
                    continue;
                }
                citations += 1;
                let source = std::fs::read_to_string(&file).unwrap_or_default();
                if !defines_fn(&source, &name) {
                    problems.push(format!(
                        "{}:{line}: `{module}::{name}` is cited, but tests/it/{module}.rs has no `fn {name}`",
                        doc.display()
                    ));
                }
            }
        }

        for (line, link_text, target) in &scanned.links {
            if target.is_empty()
                || target.contains("://")
                || target.starts_with("mailto:")
                || target.starts_with('<')
            {
                continue;
            }
            let (path_part, fragment) = match target.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (target.as_str(), None),
            };
            let resolved = if path_part.is_empty() {
                Some(doc.clone())
            } else {
                normalize(&dir.join(path_part))
            };
            // A link that leaves the repository (`../shared/API.md`) is not
            // the repository's to check.
            let Some(resolved) = resolved else { continue };
            let full = root().join(&resolved);
            if !full.exists() {
                problems.push(format!(
                    "{}:{line}: link to `{target}`: {} does not exist",
                    doc.display(),
                    resolved.display()
                ));
                continue;
            }
            if let Some(fragment) = fragment
                && full.extension().is_some_and(|x| x == "md")
            {
                let target_doc = std::fs::read_to_string(&full).unwrap_or_default();
                if !scan(&target_doc).anchors.contains(fragment) {
                    problems.push(format!(
                        "{}:{line}: link to `{target}`: {} has no heading with the anchor `#{fragment}`",
                        doc.display(),
                        resolved.display()
                    ));
                }
            }
            // A link whose text is a test must lead to that test's file.
            if let [(module, _)] = cited_names(link_text).as_slice()
                && link_text
                    .trim()
                    .trim_matches('`')
                    .split_once("::")
                    .is_some()
                && tests_dir.join(format!("{module}.rs")).is_file()
                && module != "main"
                && resolved != Path::new("tests/it").join(format!("{module}.rs"))
            {
                problems.push(format!(
                    "{}:{line}: the link `{}` cites a test of tests/it/{module}.rs but points at {}",
                    doc.display(),
                    link_text.trim(),
                    resolved.display()
                ));
            }
        }
    }
    (problems, citations)
}

#[test]
fn every_test_cited_in_the_docs_exists_and_every_relative_link_resolves() {
    let (problems, citations) = problems();
    assert!(
        problems.is_empty(),
        "{} problem(s) in the documentation:\n{}",
        problems.len(),
        problems.join("\n")
    );
    // A scanner that found nothing would pass vacuously.
    assert!(
        citations >= 10,
        "only {citations} test citations found in the docs: is the scanner broken?"
    );
}

#[test]
fn the_doc_scanner_finds_citations_links_and_anchors_and_ignores_the_rest() {
    let sample = "# Guarantees, and tests\n\
        See [`purchase::a_test`](tests/it/purchase.rs) and `faults::other_test`, \
        not `seckill::config`, `stock::keys::Keys`, `Outcome::Bought` nor `faults::`.\n\
        ```sh\n\
        cargo test --test it purchase::a_prefix\n\
        [not](a-link.md)\n\
        ```\n\
        [Config](docs/configuration.md#the-table \"title\") and [ref]: ../shared/API.md\n\
        ## Guarantees, and tests\n";
    let scanned = scan(sample);
    let names: BTreeSet<(String, String)> = scanned
        .prose
        .iter()
        .flat_map(|(_, part)| cited_names(part))
        .collect();
    let expect = |m: &str, n: &str| (m.to_string(), n.to_string());
    assert!(names.contains(&expect("purchase", "a_test")), "{names:?}");
    assert!(names.contains(&expect("faults", "other_test")), "{names:?}");
    // Not a test path by this check's rule (two parts, lower case), or in a
    // fenced block.
    assert!(
        !names.contains(&expect("purchase", "a_prefix")),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|(m, _)| m == "stock" || m == "Outcome"),
        "{names:?}"
    );

    let targets: Vec<&str> = scanned.links.iter().map(|(_, _, t)| t.as_str()).collect();
    assert_eq!(
        targets,
        ["tests/it/purchase.rs", "docs/configuration.md#the-table"],
        "{:?}",
        scanned.links
    );
    assert!(scanned.anchors.contains("guarantees-and-tests"));
    assert!(scanned.anchors.contains("guarantees-and-tests-1"));

    assert_eq!(
        slug("Services: `scripts/deps.sh`"),
        "services-scriptsdepssh"
    );
    assert!(defines_fn("async fn a_test() {}", "a_test"));
    assert!(!defines_fn("async fn a_test_longer() {}", "a_test"));
    assert_eq!(
        normalize(Path::new("docs/../README.md")),
        Some("README.md".into())
    );
    assert_eq!(normalize(Path::new("../shared/API.md")), None);
}
