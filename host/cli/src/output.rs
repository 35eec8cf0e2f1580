//! What every command shares: writing to stdout (a reader that went away ends the command),
//! the exit codes, the log, the async runtime and reading the config.

use std::path::Path;
use std::process::ExitCode;

use payhost::Config;
use payhost::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// `println!` that treats a closed stdout (`payhost check | head -1`) as the end of the
/// command's output: it exits quietly with success instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::output::stdout_failed(e);
        }
    }};
}

/// Exit code for a config that cannot be used.
pub(crate) const EXIT_CONFIG: u8 = 2;
/// Exit code for providers that failed to load.
pub(crate) const EXIT_PROVIDERS: u8 = 1;

/// What a write to stdout that failed means: a reader that went away ends the command (exit 0);
/// anything else is reported.
pub(crate) fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write the output: {e}");
    std::process::exit(1);
}

/// The async runtime of a command (`multi_thread` for those that serve or call providers at
/// once); a failure to start it is reported and becomes the exit code.
pub(crate) fn runtime(multi_thread: bool) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

pub(crate) fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::from_file(path).map_err(|e| {
        eprintln!("error[{}]: {e}", e.kind.code());
        ExitCode::from(EXIT_CONFIG)
    })
}

pub(crate) fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal: a log file or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
