//! `payhost keys new`: a new API key, shown once, and the table that holds only its digest.

use std::process::ExitCode;

use crate::output::EXIT_CONFIG;

pub(crate) fn new_key(scopes: &[String], id: Option<String>, rate: Option<f64>) -> ExitCode {
    for s in scopes {
        if payhost::auth::Scope::parse(s).is_none() {
            eprintln!("error: unknown scope `{s}`: the scopes are read, payments and operator");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let id =
        id.unwrap_or_else(|| format!("key-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    if !payhost::auth::valid_key_id(&id) {
        eprintln!("error: key id `{id}` must be 1 to 64 of a-z, 0-9, `-` and `_`");
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Some(why) = rate.and_then(|rate| {
        payhost::auth::RateLimit {
            rate,
            burst: (rate * 2.0).max(1.0),
        }
        .invalid()
    }) {
        eprintln!("error: --rate-per-second: {why}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let (secret, digest) = payhost::auth::generate(&id);
    let scopes: Vec<String> = scopes.iter().map(|s| format!("{s:?}")).collect();
    let env = format!(
        "PAYHOST_KEY_{}_DIGEST",
        id.to_ascii_uppercase().replace('-', "_")
    );
    say!("{secret}");
    say!();
    say!("# The line above is the key: give it to its client now, it is not shown again.");
    say!("# payhost keeps only its digest. Paste this into the config:");
    say!("[[api_keys]]");
    say!("id = \"{id}\"");
    say!("digest = \"{digest}\"   # or \"${{{env}}}\" with {env}={digest}");
    say!("scopes = [{}]", scopes.join(", "));
    if let Some(rate) = rate {
        say!("rate_per_second = {rate}");
        say!("burst = {}", (rate * 2.0).max(1.0));
    }
    ExitCode::SUCCESS
}
