//! The vendor kit: `payhost provider new` writes a ready provider crate from a template that
//! ships in the binary, and `payhost provider test` ([`conformance`]) checks a built library
//! the way the host loads it.

pub(crate) mod conformance;

use std::path::{Path, PathBuf};

/// The template's files: (path in the new crate, text with `{{…}}` placeholders).
const TEMPLATE: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("template/Cargo.toml.in")),
    ("src/lib.rs", include_str!("template/lib.rs.in")),
    ("README.md", include_str!("template/README.md.in")),
    (
        "payhost.example.toml",
        include_str!("template/payhost.toml.in"),
    ),
    ("options.toml", include_str!("template/options.toml.in")),
    ("scenario.toml", include_str!("template/scenario.toml.in")),
    (".gitignore", include_str!("template/gitignore.in")),
];

/// The provider-api this host speaks, which a new crate depends on.
pub(crate) const API_VERSION: &str = payhost_provider_api::API_VERSION;

/// Where the provider-api source was when this binary was built (used when it still exists,
/// so a crate generated from a source checkout builds without a registry).
const API_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../provider-api");

/// Why a crate could not be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NewError {
    /// The name is not a provider id.
    #[error(
        "`{0}` is not a provider name: use a-z, 0-9 and `_`, starting with a letter (like `acme_pay`)"
    )]
    BadName(String),
    /// The folder exists and is not empty.
    #[error("{0} already exists and is not empty: choose another --dir")]
    Exists(PathBuf),
    /// Writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// What `provider new` wrote.
#[derive(Debug)]
pub(crate) struct NewCrate {
    /// The crate's folder.
    pub(crate) dir: PathBuf,
    /// The library name (`payhost_provider_<name>`), as `library = "…"` in a config.
    pub(crate) lib: String,
    /// How it depends on provider-api (a path or a registry version).
    pub(crate) api_dependency: String,
    /// The files written, relative to `dir`.
    pub(crate) files: Vec<&'static str>,
}

/// Writes a provider crate for `name` into `dir` (default `./<crate name>`). `api_path`
/// points the dependency at a provider-api source folder instead of the registry.
pub(crate) fn new_provider(
    name: &str,
    dir: Option<&Path>,
    api_path: Option<&Path>,
) -> Result<NewCrate, NewError> {
    let valid = name.len() <= 48
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(NewError::BadName(name.to_owned()));
    }
    let crate_name = format!("payhost-provider-{}", name.replace('_', "-"));
    let lib = format!("payhost_provider_{name}");
    let dir = dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(&crate_name));
    if dir.exists()
        && std::fs::read_dir(&dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(NewError::Exists(dir));
    }
    let source = api_path.map(Path::to_path_buf).or_else(|| {
        let built = PathBuf::from(API_SOURCE);
        built.join("Cargo.toml").is_file().then_some(built)
    });
    let api_dependency = match source.and_then(|p| std::fs::canonicalize(p).ok()) {
        Some(path) => format!(
            "payhost-provider-api = {{ version = \"{API_VERSION}\", path = \"{}\" }}",
            path.display()
        ),
        None => format!("payhost-provider-api = \"{API_VERSION}\""),
    };
    let type_name: String = name
        .split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    let fill = |text: &str| {
        text.replace("{{api_dependency}}", &api_dependency)
            .replace("{{crate}}", &crate_name)
            .replace("{{lib}}", &lib)
            .replace("{{Type}}", &format!("{type_name}Provider"))
            .replace("{{Name}}", &type_name)
            .replace("{{env}}", &name.to_ascii_uppercase())
            .replace("{{name}}", name)
    };
    let mut files = Vec::new();
    for (path, text) in TEMPLATE {
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|source| NewError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        std::fs::write(&target, fill(text)).map_err(|source| NewError::Io {
            path: target.clone(),
            source,
        })?;
        files.push(*path);
    }
    Ok(NewCrate {
        dir,
        lib,
        api_dependency,
        files,
    })
}
