//! What a plugin says about itself before it is instantiated.

use serde::{Deserialize, Serialize};

use crate::protocol::PROTOCOL_VERSION;

/// The version of provider-api a plugin or host was built with.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Optional abilities. The host refuses operations a provider lacks up front, with a clear error,
/// instead of calling it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    /// Capture less than the authorized amount.
    pub partial_capture: bool,
    /// Capture several times against one authorization.
    pub multiple_captures: bool,
    /// Refund less than what was captured (and so several times).
    pub partial_refund: bool,
    /// Change the amount of an initiated payment in place (else the host recreates it).
    pub update_amount: bool,
    /// Authorization may end `pending` and complete later by webhook or retrieve.
    pub async_authorization: bool,
    /// The provider verifies and translates webhooks.
    pub webhooks: bool,
}

/// A plugin's description of itself.
///
/// A vendor fills in [`Manifest::new`] and the capabilities; the SDK fills in
/// [`Manifest::api_version`] and [`Manifest::protocols`] from the provider-api it was built with,
/// so they are always truthful.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Short machine id of the provider kind (`"stripe"`, `"system"`); `[a-z0-9_-]+`.
    pub id: String,
    /// Human name (`"Stripe"`).
    pub name: String,
    /// The plugin's own version (semver).
    pub version: String,
    /// The provider-api version the plugin was built with.
    #[serde(default)]
    pub api_version: String,
    /// Protocol versions the plugin speaks; the host picks the highest one it speaks too.
    #[serde(default)]
    pub protocols: Vec<u32>,
    /// Optional abilities.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// One line on what the provider is, for `payhost inspect`.
    #[serde(default)]
    pub description: String,
    /// Operations for which the processor answers a repeated idempotency key with the first
    /// call's result, even while that call is still being processed, and never acts twice
    /// (Stripe does, for every POST). The host may then settle an unknown capture, refund or
    /// cancel by sending it again with the same key. Leave it empty unless that is guaranteed.
    /// List only capture, refund and cancel (the ones the host sends again): a host older than
    /// an operation listed here cannot read the manifest. Since 1.3.
    #[serde(default)]
    pub replays_idempotency_keys: Vec<crate::Operation>,
    /// The provider keeps customers and their saved payment methods: it implements every
    /// operation in [`crate::Operation::ACCOUNT_HOLDER`] (set it with
    /// [`Manifest::account_holders`]). Since 1.4; a plugin built before it reads as `false`,
    /// and the host refuses those operations for it up front.
    #[serde(default)]
    pub account_holders: bool,
}

impl Manifest {
    /// A manifest with no optional capabilities.
    pub fn new(id: impl Into<String>, name: impl Into<String>, version: impl Into<String>) -> Self {
        Manifest {
            id: id.into(),
            name: name.into(),
            version: version.into(),
            api_version: API_VERSION.to_owned(),
            protocols: vec![PROTOCOL_VERSION],
            capabilities: Capabilities::default(),
            description: String::new(),
            replays_idempotency_keys: Vec::new(),
            account_holders: false,
        }
    }

    /// Declares that the provider keeps customers and their saved payment methods (the seven
    /// operations of [`crate::Operation::ACCOUNT_HOLDER`]).
    pub fn account_holders(mut self) -> Self {
        self.account_holders = true;
        self
    }

    /// Declares the operations whose repeated idempotency key the processor replays (see
    /// [`Manifest::replays_idempotency_keys`]).
    pub fn replays_idempotency_keys(mut self, operations: &[crate::Operation]) -> Self {
        self.replays_idempotency_keys = operations.to_vec();
        self
    }

    /// Sets the capabilities.
    pub fn capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// Sets the one-line description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// The highest protocol version both this manifest and `supported` list.
    pub fn negotiate(&self, supported: &[u32]) -> Option<u32> {
        self.protocols
            .iter()
            .copied()
            .filter(|v| supported.contains(v))
            .max()
    }

    /// Checks the fields a vendor fills in; `Err` says which one is wrong and why.
    pub fn validate(&self) -> Result<(), String> {
        let id_ok = !self.id.is_empty()
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !id_ok {
            return Err(format!(
                "manifest id `{}` must be non-empty and use only a-z, 0-9, `_` and `-`",
                self.id
            ));
        }
        if self.name.trim().is_empty() {
            return Err("manifest name is empty".into());
        }
        if !is_semver(&self.version) {
            return Err(format!(
                "manifest version `{}` is not a semver version (like 1.2.3)",
                self.version
            ));
        }
        if self.protocols.is_empty() {
            return Err("manifest lists no protocol version".into());
        }
        Ok(())
    }

    /// Checks that [`Manifest::replays_idempotency_keys`] lists only capture, refund and
    /// cancel: the host sends no other operation again, and a host older than an operation
    /// listed there could not read the manifest. The test kit and `payhost provider test` run
    /// it; the host does not refuse a plugin for it (plugins built before the rule still load).
    pub fn check_replays(&self) -> Result<(), String> {
        if let Some(op) = self.replays_idempotency_keys.iter().find(|op| {
            !matches!(
                op,
                crate::Operation::Capture | crate::Operation::Refund | crate::Operation::Cancel
            )
        }) {
            return Err(format!(
                "replays_idempotency_keys lists `{op}`: only capture, refund and cancel are sent \
                 again (and a host older than another operation could not read the manifest)"
            ));
        }
        Ok(())
    }
}

/// `MAJOR.MINOR.PATCH` with an optional `-pre` or `+build` suffix.
fn is_semver(v: &str) -> bool {
    let core = v.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::{Capabilities, Manifest};

    #[test]
    fn negotiation_picks_the_highest_shared_version() {
        let mut m = Manifest::new("x", "X", "1.0.0");
        m.protocols = vec![1, 2, 3];
        assert_eq!(m.negotiate(&[1, 2]), Some(2));
        assert_eq!(m.negotiate(&[4]), None);
    }

    #[test]
    fn validation_names_the_bad_field() {
        assert!(
            Manifest::new("Bad Id", "X", "1.0.0")
                .validate()
                .unwrap_err()
                .contains("id")
        );
        assert!(
            Manifest::new("ok", "X", "1.0")
                .validate()
                .unwrap_err()
                .contains("version")
        );
        assert!(Manifest::new("ok", "X", "1.0.0-beta.1").validate().is_ok());
        let replays = Manifest::new("ok", "X", "1.0.0")
            .replays_idempotency_keys(&[crate::Operation::SavePaymentMethod])
            .check_replays()
            .unwrap_err();
        assert!(replays.contains("save_payment_method"), "{replays}");
    }

    #[test]
    fn an_older_manifest_without_new_fields_still_reads() {
        let m: Manifest =
            serde_json::from_str(r#"{"id":"a","name":"A","version":"0.1.0"}"#).unwrap();
        assert_eq!(m.capabilities, Capabilities::default());
    }
}
