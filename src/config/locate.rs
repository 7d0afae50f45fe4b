//! Where a key is written: the file and line an error points at. Validation and `setup`
//! both report through `Origin`, so a bad value and an unreadable file it names read
//! the same way (`file:line: `key`: message`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::ConfigError;

/// The file a config came from, kept with the config so that errors found after
/// validation (a certificate that does not load) still name their line.
#[derive(Clone)]
pub struct Origin {
    path: PathBuf,
    source: Arc<str>,
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Origin").field(&self.path).finish()
    }
}

impl Origin {
    pub(super) fn new(path: &Path, source: &str) -> Origin {
        Origin {
            path: path.to_path_buf(),
            source: Arc::from(source),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Forgets the file's text once every file it names has loaded: nothing after that
    /// reports a config line, and at 10,000 services the text is over a megabyte.
    /// Errors made afterwards name the key without its line.
    pub fn forget_source(&mut self) {
        self.source = Arc::from("");
    }

    /// An error about `key` of `[table]` (either may be empty), with the key's line
    /// when it can be found, else the table's.
    pub fn error(&self, table: &str, key: &str, message: impl Into<String>) -> ConfigError {
        let line = locate(&self.source, table, key).or_else(|| locate(&self.source, table, ""));
        let full_key = match (table.is_empty(), key.is_empty()) {
            (true, _) => key.to_string(),
            (false, true) => table.to_string(),
            (false, false) => format!("{table}.{key}"),
        };
        ConfigError {
            file: self.path.clone(),
            key: full_key,
            line,
            message: message.into(),
        }
    }
}

pub(super) fn parse_error(source: &str, path: &Path, error: &toml::de::Error) -> ConfigError {
    let (line, key) = match error.span() {
        Some(span) => {
            let line = source[..span.start.min(source.len())].matches('\n').count() + 1;
            let table = enclosing_table(source, line);
            // The span is the key (unknown field) or the value (wrong type); either way
            // the key is what stands before `=` on that line.
            let line_start = source[..span.start.min(source.len())]
                .rfind('\n')
                .map_or(0, |i| i + 1);
            let line_text = source[line_start..].lines().next().unwrap_or("");
            let name = match line_text.split_once('=') {
                Some((name, _)) if !line_text.trim_start().starts_with('[') => {
                    name.trim().trim_matches('"').to_string()
                }
                _ => String::new(),
            };
            let key = match (table.is_empty(), name.is_empty()) {
                (_, true) => table,
                (true, false) => name,
                (false, false) => format!("{table}.{name}"),
            };
            (Some(line), key)
        }
        None => (None, String::new()),
    };
    ConfigError {
        file: path.to_path_buf(),
        key,
        line,
        message: error.message().trim().to_string(),
    }
}

/// The `[table]` header in force at 1-based `line`, or "" at the top level.
fn enclosing_table(source: &str, line: usize) -> String {
    source
        .lines()
        .take(line)
        .filter_map(|l| {
            let t = l.trim();
            t.starts_with('[')
                .then(|| t.trim_matches(|c| c == '[' || c == ']').trim().to_string())
        })
        .last()
        .unwrap_or_default()
}

/// Best-effort line of `key` inside `[table]` (or of the header itself when `key` is
/// empty); `None` for inline tables and other shapes it does not understand.
fn locate(source: &str, table: &str, key: &str) -> Option<usize> {
    let mut in_table = table.is_empty();
    for (index, line) in source.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t.trim_matches(|c| c == '[' || c == ']').trim();
            in_table = name == table;
            if in_table && key.is_empty() {
                return Some(index + 1);
            }
            continue;
        }
        if in_table && !key.is_empty() {
            if let Some(rest) = t.strip_prefix(key) {
                if rest.trim_start().starts_with('=') {
                    return Some(index + 1);
                }
            }
        }
    }
    None
}
