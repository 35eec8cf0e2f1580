//! Keeping secrets out of what is shown: the values taken from the environment and a
//! provider's secret-like options (redacted from log records and error texts), and passwords in
//! URLs.

/// Removes known secrets from text: the values taken from the environment, and a provider's
/// option values under secret-like keys (`*key*`, `*secret*`, `*token*`, `*password*`,
/// `*credential*`). Cheap to clone.
#[derive(Clone, Default)]
pub struct Redactor(std::sync::Arc<Vec<String>>);

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.0.len())
    }
}

impl Redactor {
    /// A redactor of these secrets (empty ones and ones shorter than 4 characters are ignored:
    /// they would redact ordinary words).
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Redactor {
        let mut list: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 4).collect();
        // Longest first, so a secret that contains another is removed whole.
        list.sort_by_key(|s| std::cmp::Reverse(s.len()));
        list.dedup();
        Redactor(std::sync::Arc::new(list))
    }

    /// `text` with every secret replaced by `<redacted>`.
    pub fn redact(&self, text: &str) -> String {
        self.redact_noting(text).0
    }

    /// [`Redactor::redact`], and whether anything was removed.
    pub fn redact_noting(&self, text: &str) -> (String, bool) {
        let mut out = text.to_owned();
        let mut found = false;
        for secret in self.0.iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "<redacted>");
                found = true;
            }
        }
        (out, found)
    }
}

/// The values of `options` (a provider's options, as JSON) under keys named like a secret.
pub fn option_secrets(options: &serde_json::Value) -> Vec<String> {
    fn walk(value: &serde_json::Value, secret_key: bool, out: &mut Vec<String>) {
        match value {
            serde_json::Value::String(s) if secret_key => out.push(s.clone()),
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let k = k.to_ascii_lowercase();
                    let secret = secret_key
                        || ["key", "secret", "token", "password", "credential"]
                            .iter()
                            .any(|w| k.contains(w));
                    walk(v, secret, out);
                }
            }
            serde_json::Value::Array(items) => {
                for v in items {
                    walk(v, secret_key, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(options, false, &mut out);
    out
}

/// A URL fit for a log line or `payhost check`: its password (in the authority, or a
/// `password=` query parameter) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest = &out[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                let start = scheme_end + 3 + colon + 1;
                let end = scheme_end + 3 + at;
                out.replace_range(start..end, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (base, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{base}{}", query.join("&"));
    }
    out
}
