//! The storage connector types' configs: `files` (a directory the operator shares with the
//! workers) and `s3` (an S3-compatible bucket). Both list files, read the new ones and extract
//! their text; their cursor is the newest modification time seen.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::domain::{
    kinds::input::{self, KindInput},
    FieldError,
};

/// Largest file read by default, in bytes; a larger one is listed without its text.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 10 * 1024 * 1024;
/// Most files one fetch lists by default (after the glob).
pub const DEFAULT_MAX_FILES: u32 = 100_000;

/// Config of a `files` connector: files under the namespace's directory of the workers'
/// `CAPIBARA_FILES_ROOT`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// A directory relative to the namespace's files directory
    /// (`$CAPIBARA_FILES_ROOT/<namespace>/`); empty: that directory itself. No `..`, no
    /// absolute paths; symbolic links are not followed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schema(
        max_length = 1024,
        pattern = "^((\\.|\\.\\.[^/\\x00]+|\\.?[^./\\x00][^/\\x00]*)(/(\\.|\\.\\.[^/\\x00]+|\\.?[^./\\x00][^/\\x00]*))*)?$"
    )]
    pub path: String,
    /// A glob over paths relative to `path` (`**/*.md`, `reports/*.{pdf,txt}`; default: every
    /// file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, min_length = 1, max_length = 500)]
    pub glob: Option<String>,
    /// Walk subdirectories (default true); false: the files directly in `path` only.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub recursive: bool,
    /// Read the files' text (default true): txt, md, html (as text), json, csv, xml and pdf.
    /// False: items carry name, type, size and time only.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub extract: bool,
    /// Largest file read, in bytes (default 10 MiB, at most 100 MiB); a larger one is listed
    /// without its text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 104_857_600, nullable = false)]
    pub max_file_bytes: Option<u64>,
    /// Most files one fetch lists (default 100,000); past it the fetch fails rather than
    /// list part of a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1_000_000, nullable = false)]
    pub max_files: Option<u32>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl KindInput for FilesConfig {
    fn check(&self) -> Result<(), FieldError> {
        check_relative("path", &self.path)?;
        check_glob(self.glob.as_deref())
    }
}

/// A relative path that stays below its base: `/`-separated parts, none empty, none `..`, no
/// NUL (what the schema's pattern says).
fn check_relative(field: &str, path: &str) -> Result<(), FieldError> {
    let bad = !path.is_empty()
        && path
            .split('/')
            .any(|part| part.is_empty() || part == ".." || part.contains('\0'));
    if bad {
        return Err(FieldError::new(
            field,
            "must be a relative path without `..` (below the namespace's files directory)",
        ));
    }
    Ok(())
}

/// A glob that globset compiles.
fn check_glob(glob: Option<&str>) -> Result<(), FieldError> {
    if let Some(g) = glob {
        compile_glob(g).map_err(|e| FieldError::new("glob", e))?;
    }
    Ok(())
}

/// A glob as the storage types match it: `/` separates path parts, `*` stays within one,
/// `**` crosses them, `{a,b}` alternates.
pub fn compile_glob(glob: &str) -> Result<globset::GlobMatcher, String> {
    globset::GlobBuilder::new(glob)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("is not a valid glob: {}", e.kind()))
}

pub(super) fn files_schema() -> Value {
    input::schema::<FilesConfig>()
}

/// Config of an `s3` connector: objects of an S3-compatible bucket (AWS S3, MinIO, R2, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The bucket's name.
    #[schema(
        min_length = 3,
        max_length = 63,
        pattern = "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
    )]
    pub bucket: String,
    /// Only keys starting with this (`reports/2026/`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schema(max_length = 1024)]
    pub prefix: String,
    /// The service's http(s) URL (default: AWS, `https://s3.<region>.amazonaws.com`). Requests
    /// are path-style (`<endpoint>/<bucket>/<key>`). Private and loopback addresses are refused
    /// unless `CAPIBARA_OUTBOUND_ALLOW_PRIVATE=true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 2048)]
    pub endpoint: Option<String>,
    /// The bucket's region (default `us-east-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        nullable = false,
        min_length = 1,
        max_length = 64,
        pattern = "^[a-z0-9-]+$"
    )]
    pub region: Option<String>,
    /// A glob over keys after `prefix` (`**/*.pdf`; default: every object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, min_length = 1, max_length = 500)]
    pub glob: Option<String>,
    /// Read the objects' text (default true), as for `files`.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub extract: bool,
    /// Largest object read, in bytes (default 10 MiB, at most 100 MiB); a larger one is listed
    /// without its text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 104_857_600, nullable = false)]
    pub max_file_bytes: Option<u64>,
    /// Most objects one fetch lists (default 100,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1_000_000, nullable = false)]
    pub max_files: Option<u32>,
    /// Seconds the whole listing and reading may take (default 30, 1-300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 300, nullable = false)]
    pub timeout_s: Option<u32>,
}

impl KindInput for S3Config {
    fn check(&self) -> Result<(), FieldError> {
        if let Some(e) = &self.endpoint {
            crate::outbound::parse_url(e)
                .map_err(|err| FieldError::new("endpoint", err.to_string()))?;
        }
        check_glob(self.glob.as_deref())
    }
}

pub(super) fn s3_schema() -> Value {
    let mut s = input::schema::<S3Config>();
    s["properties"]["endpoint"]["pattern"] = json!(super::types::URL_PATTERN);
    s
}

/// Where an `s3` connector takes secrets: the access key pair.
pub(super) fn s3_secret_place(place: &str) -> bool {
    matches!(
        place,
        "auth.access_key_id" | "auth.secret_access_key" | "auth.session_token"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_paths_stay_below_the_namespace_directory() {
        let field = |v: Value| input::parse::<FilesConfig>(&v).err().map(|e| e.field);
        assert_eq!(field(json!({})), None);
        assert_eq!(
            field(json!({"path": "docs/notes", "glob": "**/*.md"})),
            None
        );
        for bad in ["/etc", "../other", "a/../../b", "a/..", "a//b", "a/"] {
            assert_eq!(field(json!({"path": bad})), Some("path".into()), "{bad}");
        }
        assert_eq!(field(json!({"glob": "a/[b"})), Some("glob".into()));
        let schema = jsonschema::validator_for(&files_schema()).unwrap();
        for ok in ["docs/a..b", "./a/.b/..c", "x"] {
            assert!(schema.is_valid(&json!({"path": ok})), "{ok}");
            assert_eq!(field(json!({"path": ok})), None, "{ok}");
        }
        for bad in ["/etc", "../x", "a/../b", "..", "a//b"] {
            assert!(!schema.is_valid(&json!({"path": bad})), "{bad}");
        }
    }

    #[test]
    fn globs_keep_star_within_one_path_part() {
        let g = compile_glob("*.md").unwrap();
        assert!(g.is_match("a.md") && !g.is_match("d/a.md"));
        let g = compile_glob("**/*.{md,txt}").unwrap();
        assert!(g.is_match("a.md") && g.is_match("d/e/a.txt") && !g.is_match("a.pdf"));
    }

    #[test]
    fn s3_configs_name_the_bad_field() {
        let field = |v: Value| input::parse::<S3Config>(&v).err().map(|e| e.field);
        assert_eq!(field(json!({"bucket": "docs"})), None);
        assert_eq!(
            field(json!({"bucket": "docs", "endpoint": "ftp://x"})),
            Some("endpoint".into())
        );
        assert_eq!(field(json!({"bucket": "D"})), Some("bucket".into()));
        assert_eq!(
            field(json!({"bucket": "docs", "glob": "{"})),
            Some("glob".into())
        );
    }
}
