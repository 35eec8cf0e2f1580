//! `payhost inspect`: one library's manifest, with no config.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use payhost::config::LogFormat;
use payhost::{Inspection, Loader};

use super::check::capability_names;
use crate::output::{EXIT_PROVIDERS, init_logging};

pub(crate) fn inspect(library: &Path, plugin_dir: Option<PathBuf>, json: bool) -> ExitCode {
    init_logging("warn", LogFormat::Text);
    let loader = match plugin_dir {
        Some(dir) => Loader::with_plugin_dir(dir),
        None => Loader::with_plugin_dir(
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(Into::into))
                .unwrap_or_else(|| PathBuf::from(".")),
        ),
    };
    match loader.inspect(library) {
        Ok(i) if json => {
            say!(
                "{}",
                serde_json::json!({
                    "manifest": i.manifest,
                    "protocol": i.protocol,
                    "library": i.library.path,
                    "sha256": i.library.sha256,
                    "isolation": ["in_process", "process"],
                })
            );
            ExitCode::SUCCESS
        }
        Ok(i) => {
            print_inspection(&i);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error[{}]: {e}", e.code());
            ExitCode::from(EXIT_PROVIDERS)
        }
    }
}

fn print_inspection(i: &Inspection) {
    let m = &i.manifest;
    say!("id            {}", m.id);
    say!("name          {}", m.name);
    say!("version       {}", m.version);
    if !m.description.is_empty() {
        say!("description   {}", m.description);
    }
    say!("api version   {}", m.api_version);
    say!(
        "protocols     {:?} (this host: {})",
        m.protocols,
        i.protocol
            .map(|p| format!("speaks {p}"))
            .unwrap_or_else(|| "none in common".into())
    );
    say!("capabilities  {}", capability_names(m).join(", "));
    say!("library       {}", i.library.path.display());
    say!("sha256        {}", i.library.sha256);
    // Isolation is the operator's choice per provider, not the library's: say what it can be.
    say!(
        "isolation     loaded in_process here; any library also runs in a worker (isolation = \"process\"), see `payhost check` for a config's choice"
    );
}
