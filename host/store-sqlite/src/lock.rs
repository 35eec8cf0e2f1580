//! One host per file: the lock file beside the database, and the database's files kept this
//! user's alone.

use std::path::{Path, PathBuf};

use payhost_core::store::StoreError;

/// The lock file beside a database: `<file>.lock`, holding its owner's pid.
pub(crate) fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Makes the database file (and, if present, its WAL, shared memory and lock files) readable
/// and writable by this user only. SQLite gives the WAL and shared-memory files it creates the
/// database file's mode, so creating the database 0600 keeps them 0600 too.
pub(crate) fn private_files(db: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if !db.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(db)
            .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", db.display())))?;
    }
    let suffixed = |suffix: &str| {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        std::path::PathBuf::from(name)
    };
    for file in [
        db.to_owned(),
        suffixed("-wal"),
        suffixed("-shm"),
        lock_path(db),
    ] {
        if let Ok(meta) = std::fs::metadata(&file)
            && meta.permissions().mode() & 0o077 != 0
        {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(
                |e| {
                    StoreError::Unavailable(format!(
                        "cannot make {} private (0600): {e}",
                        file.display()
                    ))
                },
            )?;
            tracing::info!(file = %file.display(), "made the database file private (0600)");
        }
    }
    Ok(())
}

/// Takes the database's lock, or says which process holds it. A second host on one file would
/// take the first one's live calls for abandoned ones and settle them.
pub(crate) fn take_lock(db: &Path) -> Result<std::fs::File, StoreError> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = lock_path(db);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {
            let pid = std::process::id().to_string();
            let _ = file.set_len(0);
            let _ = file.rewind();
            let _ = file.write_all(pid.as_bytes());
            let _ = file.sync_data();
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            Err(StoreError::Locked(format!(
                "the SQLite database {} is in use by another payhost process{}: one host per SQLite file. Stop it first, or use PostgreSQL for several hosts",
                db.display(),
                if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                }
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Unavailable(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}
