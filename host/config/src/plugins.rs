//! `[plugins]`: where libraries are, the executable workers run, and the user they run as.

use std::path::PathBuf;

use serde::Deserialize;

use crate::{Check, ConfigError};

/// The user and group workers run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUser {
    /// As the config names it.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// The group's gid (`worker_group`, or the user's primary group).
    pub gid: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPlugins {
    pub(crate) dir: Option<PathBuf>,
    pub(crate) worker: Option<PathBuf>,
    pub(crate) worker_user: Option<String>,
    pub(crate) worker_group: Option<String>,
}

/// The user `[plugins] worker_user` (and `worker_group`) name, resolved on this machine.
pub(crate) fn worker_user(
    raw: &RawPlugins,
    check: &Check<'_>,
) -> Result<Option<WorkerUser>, ConfigError> {
    Ok(match (&raw.worker_user, &raw.worker_group) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(check.invalid(
                check.span("plugins.worker_group"),
                "plugins.worker_group".into(),
                "`worker_group` needs `worker_user`".into(),
            ));
        }
        (Some(user), group) => Some(resolve_worker_user(user, group.as_deref()).map_err(
            |message| {
                let key = if message.contains("group") {
                    "plugins.worker_group"
                } else {
                    "plugins.worker_user"
                };
                check.invalid(check.span(key), key.into(), message)
            },
        )?),
    })
}

/// The uid and gid of `user` (a name or a number) and `group` (default: the user's own).
fn resolve_worker_user(user: &str, group: Option<&str>) -> Result<WorkerUser, String> {
    use nix::unistd::{Gid, Group, Uid, User};
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    }
    .map_err(|e| format!("cannot look up worker_user `{user}`: {e}"))?;
    let (uid, primary) = match (found, user.parse::<u32>()) {
        (Some(u), _) => (u.uid.as_raw(), u.gid.as_raw()),
        // A bare number with no passwd entry is still a uid; its group must be given.
        (None, Ok(uid)) => (uid, u32::MAX),
        (None, Err(_)) => {
            return Err(format!(
                "worker_user `{user}` does not exist on this machine"
            ));
        }
    };
    let gid = match group {
        None if primary == u32::MAX => {
            return Err(format!(
                "worker_user {uid} has no passwd entry: give its worker_group too"
            ));
        }
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(g)
                .map_err(|e| format!("cannot look up worker_group `{g}`: {e}"))?
                .map(|grp| grp.gid.as_raw())
                .ok_or_else(|| format!("worker_group `{g}` does not exist on this machine"))?,
        },
    };
    if uid == 0 {
        return Err(
            "worker_user must not be root: the point is a user without the host's rights".into(),
        );
    }
    let _ = Gid::from_raw(gid);
    Ok(WorkerUser {
        name: user.to_owned(),
        uid,
        gid,
    })
}
