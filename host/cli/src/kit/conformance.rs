//! `payhost provider test`: black-box conformance of a built provider library, loaded the way
//! the host loads it (a config, the loader's checks, the call path with its deadlines and
//! concurrency slots), driven over a scripted scenario.
//!
//! Every check has a stable name, a verdict, what was expected and what came back. Invariants:
//! a check that cannot be observed from outside (a webhook scheme the scenario does not give)
//! is *skipped* and says what would enable it, never passed; secrets are taken from the
//! options and looked for in every log line the provider wrote and every answer it gave.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use payhost_provider_api::{
    AccountHolderRef, AttemptRef, AuthorizeRequest, CancelRequest, CaptureRequest,
    CreateAccountHolderRequest, Customer, DeleteAccountHolderRequest, DeletePaymentMethodRequest,
    DeleteRequest, ErrorKind, HolderStatus, InitiateRequest, ListPaymentMethodsRequest, Manifest,
    Operation, Outcome, PaymentMethodRef, ProviderResponse, RefundRequest,
    RetrieveAccountHolderRequest, RetrieveRequest, RetrieveResponse, SavePaymentMethodRequest,
    UpdateAccountHolderRequest, UpdateRequest, WebhookRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use payhost::provider::{CallError, Provider};

/// What a check concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Verdict {
    /// As expected.
    Pass,
    /// Not as expected: the provider breaks the contract here.
    Fail,
    /// Could not be observed with what was given (says what would enable it).
    Skip,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Check {
    /// Stable name (`idempotency.capture`, `retrieve.never_sent`, …).
    pub(crate) name: &'static str,
    /// Its verdict.
    pub(crate) verdict: Verdict,
    /// What the contract asks.
    pub(crate) expected: String,
    /// What came back.
    pub(crate) got: String,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// The library file tested.
    pub(crate) library: PathBuf,
    /// Its manifest, when it loaded.
    pub(crate) manifest: Option<Manifest>,
    /// How it ran (`in_process` or `process`).
    pub(crate) isolation: String,
    /// The checks, in the order they ran.
    pub(crate) checks: Vec<Check>,
}

impl Report {
    /// How many checks have this verdict.
    pub(crate) fn count(&self, verdict: Verdict) -> usize {
        self.checks.iter().filter(|c| c.verdict == verdict).count()
    }

    /// Whether no check failed.
    pub(crate) fn passed(&self) -> bool {
        self.count(Verdict::Fail) == 0
    }

    /// The report as JUnit XML (one test case per check).
    pub(crate) fn junit(&self) -> String {
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;")
        };
        let suite = self
            .manifest
            .as_ref()
            .map(|m| format!("{} {}", m.id, m.version))
            .unwrap_or_else(|| self.library.display().to_string());
        let mut out = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"payhost provider test: {}\" tests=\"{}\" failures=\"{}\" skipped=\"{}\">\n",
            esc(&suite),
            self.checks.len(),
            self.count(Verdict::Fail),
            self.count(Verdict::Skip)
        );
        for c in &self.checks {
            out += &format!(
                "  <testcase classname=\"payhost.provider\" name=\"{}\">",
                esc(c.name)
            );
            match c.verdict {
                Verdict::Pass => {}
                Verdict::Fail => {
                    out += &format!(
                        "<failure message=\"expected: {}\">got: {}</failure>",
                        esc(&c.expected),
                        esc(&c.got)
                    )
                }
                Verdict::Skip => out += &format!("<skipped message=\"{}\"/>", esc(&c.got)),
            }
            out += "</testcase>\n";
        }
        out + "</testsuite>\n"
    }
}

/// A vendor's scenario (`--scenario <file>`, TOML); every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Scenario {
    /// ISO 4217 code of the payments (default `eur`).
    pub(crate) currency: String,
    /// Amount of each payment in minor units (default 1500; at least 4, so it can be split).
    pub(crate) amount: i64,
    /// The cart context sent with initiate, update and authorize.
    pub(crate) context: Value,
    /// What a caller sends with authorize (a test card, a payment method).
    pub(crate) authorize_input: Value,
    /// An authorize input the processor declines (a declining test card); checked when given.
    pub(crate) decline_input: Option<Value>,
    /// What a caller sends to save a payment method (a test card, a token): the account
    /// holder checks save it when the manifest declares `account_holders`.
    pub(crate) save_input: Option<Value>,
    /// How the provider's webhooks are signed, for the valid and stale webhook checks.
    pub(crate) webhook: Option<WebhookScenario>,
    /// Option keys whose values are secrets, beside those named like one (`*key*`,
    /// `*secret*`, `*token*`, `*password*`).
    pub(crate) secrets: Vec<String>,
    /// Deadline of one call in ms (default 10000).
    pub(crate) timeout_ms: u64,
    /// Deadline of the short-deadline check in ms (default 200).
    pub(crate) short_deadline_ms: u64,
    /// Calls made at once by the concurrency check (default 64).
    pub(crate) concurrency: usize,
    /// The processor behind this run ignores repeated idempotency keys (a test double such as
    /// localstripe does; the real one must not): the repeated-capture check is then skipped,
    /// saying so, instead of failing for the double's sake.
    pub(crate) processor_ignores_idempotency_keys: bool,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            currency: "eur".into(),
            amount: 1500,
            context: json!({}),
            authorize_input: Value::Null,
            decline_input: None,
            save_input: None,
            webhook: None,
            secrets: Vec::new(),
            timeout_ms: 10_000,
            short_deadline_ms: 200,
            concurrency: 64,
            processor_ignores_idempotency_keys: false,
        }
    }
}

/// A webhook signing scheme the checks can produce signatures for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WebhookScenario {
    /// The scheme: `stripe` (`t=<unix s>,v1=<hex HMAC-SHA256 of "<t>.<body>">`).
    pub(crate) scheme: String,
    /// The header carrying the signature (`stripe-signature`).
    pub(crate) header: String,
    /// The signing secret (the same as in the options).
    pub(crate) secret: String,
    /// A body the provider accepts once signed.
    pub(crate) body: String,
    /// The oldest timestamp it accepts, in seconds (default 300).
    #[serde(default = "default_tolerance")]
    pub(crate) tolerance_s: i64,
}

fn default_tolerance() -> i64 {
    300
}

/// How to run the library.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The built library.
    pub(crate) library: PathBuf,
    /// Its `[providers.<id>.options]` table.
    pub(crate) options: toml::Table,
    /// `in_process` or `process`.
    pub(crate) isolation: String,
    /// The payhost executable for `process` (default: this one).
    pub(crate) worker: Option<PathBuf>,
}

/// Reads a scenario file.
pub(crate) fn read_scenario(path: &Path) -> Result<Scenario, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let scenario: Scenario =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if scenario.amount < 4 {
        return Err(format!(
            "{}: amount must be at least 4 (it is split into partial captures and refunds)",
            path.display()
        ));
    }
    if let Some(w) = &scenario.webhook
        && w.scheme != "stripe"
    {
        return Err(format!(
            "{}: webhook.scheme `{}` is not one the checks can sign (known: stripe)",
            path.display(),
            w.scheme
        ));
    }
    Ok(scenario)
}

/// The provider id the library is loaded under.
const ID: &str = "under_test";
/// An option key no provider expects.
const PROBE_KEY: &str = "payhost_conformance_unknown_key";

/// Runs every check. `logs` is what the provider logged through the host, read after the run
/// (install it as the process's log writer first: see [`LogCapture`]).
pub(crate) async fn run(target: &Target, scenario: &Scenario, logs: &LogCapture) -> Report {
    let mut report = Report {
        library: target.library.clone(),
        manifest: None,
        isolation: target.isolation.clone(),
        checks: Vec::new(),
    };
    let mut run = Run {
        checks: &mut report.checks,
        scenario,
        answers: Vec::new(),
        next: 0,
    };
    let scratch = match Scratch::new() {
        Ok(s) => s,
        Err(e) => {
            run.fail("loads", "a scratch folder for the config", e);
            return report;
        }
    };
    let provider = match load(&scratch, target, &target.options, scenario) {
        Ok(p) => p,
        Err(e) => {
            run.fail("loads", "the library loads with these options", e);
            return report;
        }
    };
    run.pass("loads", "the library loads with these options");
    report.manifest = Some(provider.manifest().clone());
    let manifest = provider.manifest().clone();
    match manifest.validate().and_then(|()| manifest.check_replays()) {
        Ok(()) => run.pass(
            "manifest",
            "a valid manifest (id, name, semver version, protocols)",
        ),
        Err(e) => run.fail("manifest", "a valid manifest", e),
    }
    run.unknown_option(&scratch, target, scenario);
    run.unknown_operation(&provider).await;
    run.flow(&provider, &manifest).await;
    run.idempotency(&provider).await;
    run.retrieve(&provider).await;
    run.concurrency(&provider).await;
    run.short_deadline(&provider).await;
    run.webhooks(&provider, &manifest).await;
    run.account_holders(&provider, &manifest).await;
    run.latency(&provider).await;
    let secrets = secrets(&target.options, &scenario.secrets);
    let answers = std::mem::take(&mut run.answers);
    run.secrets(&secrets, &logs.text(), &answers);
    provider.stop();
    report
}

/// The options' secret values: those under keys named like a secret, or named by the scenario.
fn secrets(options: &toml::Table, named: &[String]) -> Vec<String> {
    fn walk(table: &toml::Table, named: &[String], out: &mut Vec<String>) {
        for (key, value) in table {
            let k = key.to_ascii_lowercase();
            let secret_like = ["key", "secret", "token", "password", "credential"]
                .iter()
                .any(|w| k.contains(w))
                || named.iter().any(|n| n == key);
            match value {
                toml::Value::String(s) if secret_like && s.len() >= 6 => out.push(s.clone()),
                toml::Value::Table(t) => walk(t, named, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(options, named, &mut out);
    out
}

fn load(
    scratch: &Scratch,
    target: &Target,
    options: &toml::Table,
    scenario: &Scenario,
) -> Result<Arc<Provider>, String> {
    let mut table = toml::Table::new();
    table.insert(
        "path".into(),
        toml::Value::String(target.library.display().to_string()),
    );
    table.insert(
        "isolation".into(),
        toml::Value::String(target.isolation.clone()),
    );
    table.insert(
        "timeout_ms".into(),
        toml::Value::Integer(scenario.timeout_ms as i64),
    );
    table.insert(
        "max_concurrency".into(),
        toml::Value::Integer(scenario.concurrency.max(1) as i64),
    );
    table.insert("options".into(), toml::Value::Table(options.clone()));
    let mut providers = toml::Table::new();
    providers.insert(ID.into(), toml::Value::Table(table));
    let mut root = toml::Table::new();
    if let Some(worker) = &target.worker {
        let mut plugins = toml::Table::new();
        plugins.insert(
            "worker".into(),
            toml::Value::String(worker.display().to_string()),
        );
        root.insert("plugins".into(), toml::Value::Table(plugins));
    }
    let mut log = toml::Table::new();
    log.insert("level".into(), toml::Value::String("debug".into()));
    root.insert("log".into(), toml::Value::Table(log));
    root.insert("providers".into(), toml::Value::Table(providers));
    let text = toml::to_string(&root).map_err(|e| e.to_string())?;
    let path = scratch.0.join("payhost.toml");
    // The options hold secrets: only this user may read them (the folder is private too).
    write_private(&path, &text)?;
    let config = payhost::Config::from_file(&path).map_err(|e| e.to_string())?;
    let report = payhost::Loader::new(&config).load_all(&config);
    if let Some(f) = report.failures.first() {
        return Err(format!("error[{}]: {}", f.error.code(), f.error));
    }
    report
        .providers
        .get(ID)
        .cloned()
        .ok_or_else(|| "the loader gave no provider".into())
}

/// Writes a file (in the private scratch folder) that only this user may read.
fn write_private(path: &std::path::Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A folder for the generated config, removed afterwards.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch, String> {
        let dir = std::env::temp_dir().join(format!(
            "payhost-provider-test-{}",
            uuid::Uuid::new_v4().simple()
        ));
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The log lines written while the checks ran.
#[derive(Debug, Clone, Default)]
pub(crate) struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// Everything logged so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> LogCapture {
        self.clone()
    }
}

struct Run<'a> {
    checks: &'a mut Vec<Check>,
    scenario: &'a Scenario,
    /// Every answer's text, searched for secrets at the end.
    answers: Vec<String>,
    next: u32,
}

/// A session's provider data as the host keeps it: replaced by each answer that has some.
#[derive(Default, Clone)]
struct Session {
    id: String,
    data: Value,
}

type Answer = Result<ProviderResponse, CallError>;

fn show(answer: &Answer) -> String {
    match answer {
        Ok(r) => match &r.reference {
            Some(reference) => format!("{} (reference {reference})", r.outcome.name()),
            None => r.outcome.name().to_owned(),
        },
        Err(CallError::Provider(e)) => format!("error {}: {}", e.kind.code(), e.message),
        Err(e) => e.to_string(),
    }
}

impl Run<'_> {
    fn record(&mut self, name: &'static str, verdict: Verdict, expected: &str, got: String) {
        self.checks.push(Check {
            name,
            verdict,
            expected: expected.to_owned(),
            got,
        });
    }

    fn pass(&mut self, name: &'static str, expected: &str) {
        self.record(name, Verdict::Pass, expected, "as expected".into());
    }

    fn fail(&mut self, name: &'static str, expected: &str, got: impl Into<String>) {
        self.record(name, Verdict::Fail, expected, got.into());
    }

    fn skip(&mut self, name: &'static str, expected: &str, why: impl Into<String>) {
        self.record(name, Verdict::Skip, expected, why.into());
    }

    fn verdict(&mut self, name: &'static str, expected: &str, ok: bool, got: String) {
        let verdict = if ok { Verdict::Pass } else { Verdict::Fail };
        self.record(name, verdict, expected, got);
    }

    fn key(&mut self, what: &str) -> String {
        self.next += 1;
        format!("conformance-{what}-{}-{}", std::process::id(), self.next)
    }

    fn session(&mut self) -> Session {
        Session {
            id: format!("ps_conformance_{}", uuid::Uuid::new_v4().simple()),
            data: json!({}),
        }
    }

    fn keep(&mut self, session: &mut Session, answer: &Answer) {
        if let Ok(r) = answer {
            self.answers
                .push(serde_json::to_string(r).unwrap_or_default());
            if let Some(data) = &r.data {
                session.data = data.clone();
            }
        } else if let Err(e) = answer {
            self.answers.push(e.to_string());
        }
    }

    async fn initiate(&mut self, p: &Provider, s: &mut Session) -> Answer {
        let request = InitiateRequest {
            session_id: s.id.clone(),
            idempotency_key: self.key("initiate"),
            amount: self.scenario.amount,
            currency_code: self.scenario.currency.clone(),
            context: self.scenario.context.clone(),
            data: s.data.clone(),
            input: Value::Null,
            account_holder: None,
            deadline_unix_ms: None,
        };
        let answer = p.call(request).await;
        self.keep(s, &answer);
        answer
    }

    fn authorize_request(&mut self, s: &Session, input: Value) -> AuthorizeRequest {
        AuthorizeRequest {
            session_id: s.id.clone(),
            idempotency_key: self.key("authorize"),
            amount: self.scenario.amount,
            currency_code: self.scenario.currency.clone(),
            context: self.scenario.context.clone(),
            data: s.data.clone(),
            input,
            account_holder: None,
            payment_method: None,
            deadline_unix_ms: None,
        }
    }

    async fn authorize(&mut self, p: &Provider, s: &mut Session) -> Answer {
        let request = self.authorize_request(s, self.scenario.authorize_input.clone());
        let answer = p.call(request).await;
        self.keep(s, &answer);
        answer
    }

    fn capture_request(&mut self, s: &Session, amount: i64) -> CaptureRequest {
        CaptureRequest {
            session_id: s.id.clone(),
            payment_id: format!("pay_{}", &s.id[3..]),
            idempotency_key: self.key("capture"),
            amount,
            currency_code: self.scenario.currency.clone(),
            data: s.data.clone(),
            deadline_unix_ms: None,
        }
    }

    fn retrieve_request(&mut self, s: &Session, attempt: Option<AttemptRef>) -> RetrieveRequest {
        RetrieveRequest {
            session_id: s.id.clone(),
            payment_id: Some(format!("pay_{}", &s.id[3..])),
            idempotency_key: self.key("retrieve"),
            amount: self.scenario.amount,
            currency_code: self.scenario.currency.clone(),
            data: s.data.clone(),
            attempt,
            deadline_unix_ms: None,
        }
    }

    async fn retrieve_call(
        &mut self,
        p: &Provider,
        s: &Session,
        attempt: Option<AttemptRef>,
    ) -> Result<RetrieveResponse, CallError> {
        let request = self.retrieve_request(s, attempt);
        let answer = p.call(request).await;
        match &answer {
            Ok(r) => self
                .answers
                .push(serde_json::to_string(r).unwrap_or_default()),
            Err(e) => self.answers.push(e.to_string()),
        }
        answer
    }

    /// A session initiated and authorized, or the check that failed says why.
    async fn authorized(&mut self, p: &Provider, check: &'static str) -> Option<Session> {
        let mut s = self.session();
        let answer = self.initiate(p, &mut s).await;
        if !processed(&answer) {
            self.fail(check, "initiate to be processed first", show(&answer));
            return None;
        }
        let answer = self.authorize(p, &mut s).await;
        if !processed(&answer) {
            self.fail(
                check,
                "authorize (with the scenario's authorize_input) to be processed first",
                show(&answer),
            );
            return None;
        }
        Some(s)
    }

    fn unknown_option(&mut self, scratch: &Scratch, target: &Target, scenario: &Scenario) {
        let expected = "options with an unknown key are refused, naming the key";
        let mut options = target.options.clone();
        options.insert(PROBE_KEY.into(), toml::Value::Boolean(true));
        match load(scratch, target, &options, scenario) {
            Ok(p) => {
                p.stop();
                self.fail(
                    "options.unknown_key_refused",
                    expected,
                    format!("`{PROBE_KEY}` was accepted (add #[serde(deny_unknown_fields)] to the options)"),
                )
            }
            Err(e) if e.contains(PROBE_KEY) => self.pass("options.unknown_key_refused", expected),
            Err(e) => self.fail(
                "options.unknown_key_refused",
                expected,
                format!("refused without naming the key: {e}"),
            ),
        }
    }

    async fn unknown_operation(&mut self, p: &Provider) {
        let expected = "an operation it does not know answers `unsupported`";
        match p.call_custom("payhost_conformance_probe", json!({})).await {
            Err(CallError::Provider(e)) if e.kind == ErrorKind::Unsupported => {
                self.pass("unknown_operation", expected)
            }
            other => self.fail("unknown_operation", expected, format!("{other:?}")),
        }
    }

    async fn flow(&mut self, p: &Provider, m: &Manifest) {
        let c = m.capabilities;
        let amount = self.scenario.amount;
        // initiate → (update) → authorize → capture(s) → refund.
        let mut s = self.session();
        let answer = self.initiate(p, &mut s).await;
        let ok = processed(&answer);
        self.verdict("flow.initiate", "initiate is processed", ok, show(&answer));
        if !ok {
            return;
        }
        let update = UpdateRequest {
            session_id: s.id.clone(),
            idempotency_key: self.key("update"),
            amount,
            currency_code: self.scenario.currency.clone(),
            context: self.scenario.context.clone(),
            data: s.data.clone(),
            input: Value::Null,
            deadline_unix_ms: None,
        };
        let answer = p.call(update).await;
        self.keep(&mut s, &answer);
        let unsupported =
            matches!(&answer, Err(CallError::Provider(e)) if e.kind == ErrorKind::Unsupported);
        if c.update_amount {
            let ok = processed(&answer);
            self.verdict(
                "flow.update",
                "update is processed (the manifest declares update_amount)",
                ok,
                show(&answer),
            );
        } else if unsupported || processed(&answer) {
            self.pass(
                "flow.update",
                "update answers unsupported or processed (no update_amount declared)",
            );
        } else {
            self.fail(
                "flow.update",
                "update answers unsupported or processed",
                show(&answer),
            );
        }
        let answer = self.authorize(p, &mut s).await;
        let ok = processed(&answer);
        self.verdict(
            "flow.authorize",
            "authorize (with the scenario's authorize_input) is processed",
            ok,
            show(&answer),
        );
        if !ok {
            return;
        }
        let first = if c.partial_capture {
            amount / 2
        } else {
            amount
        };
        let request = self.capture_request(&s, first);
        let answer = p.call(request).await;
        self.keep(&mut s, &answer);
        let what = if c.partial_capture {
            "a partial capture is processed (partial_capture declared)"
        } else {
            "a capture of the whole amount is processed"
        };
        let ok = processed(&answer);
        self.verdict("flow.capture", what, ok, show(&answer));
        if !ok {
            return;
        }
        if c.partial_capture && c.multiple_captures {
            let request = self.capture_request(&s, amount - first);
            let answer = p.call(request).await;
            self.keep(&mut s, &answer);
            self.verdict(
                "flow.capture_again",
                "a second capture of the rest is processed (multiple_captures declared)",
                processed(&answer),
                show(&answer),
            );
        } else {
            self.skip(
                "flow.capture_again",
                "a second capture is processed",
                "multiple_captures is not declared",
            );
        }
        let refund = if c.partial_refund { first / 2 } else { first };
        let request = RefundRequest {
            session_id: s.id.clone(),
            payment_id: format!("pay_{}", &s.id[3..]),
            idempotency_key: self.key("refund"),
            amount: refund,
            currency_code: self.scenario.currency.clone(),
            data: s.data.clone(),
            reason: Some("conformance".into()),
            deadline_unix_ms: None,
        };
        let answer = p.call(request).await;
        self.keep(&mut s, &answer);
        self.verdict(
            "flow.refund",
            if c.partial_refund {
                "a partial refund is processed (partial_refund declared)"
            } else {
                "a refund of the capture is processed"
            },
            processed(&answer),
            show(&answer),
        );

        // initiate → authorize → cancel.
        if let Some(mut s) = self.authorized(p, "flow.cancel").await {
            let request = CancelRequest {
                session_id: s.id.clone(),
                payment_id: Some(format!("pay_{}", &s.id[3..])),
                idempotency_key: self.key("cancel"),
                amount,
                currency_code: self.scenario.currency.clone(),
                data: s.data.clone(),
                deadline_unix_ms: None,
            };
            let answer = p.call(request).await;
            self.keep(&mut s, &answer);
            self.verdict(
                "flow.cancel",
                "cancelling an authorization is processed",
                processed(&answer),
                show(&answer),
            );
        }

        // initiate → delete.
        let mut s = self.session();
        let answer = self.initiate(p, &mut s).await;
        if processed(&answer) {
            let request = DeleteRequest {
                session_id: s.id.clone(),
                idempotency_key: self.key("delete"),
                amount,
                currency_code: self.scenario.currency.clone(),
                data: s.data.clone(),
                deadline_unix_ms: None,
            };
            let answer = p.call(request).await;
            self.keep(&mut s, &answer);
            self.verdict(
                "flow.delete",
                "deleting an initiated session is processed",
                processed(&answer),
                show(&answer),
            );
        } else {
            self.fail(
                "flow.delete",
                "initiate to be processed first",
                show(&answer),
            );
        }

        // A declining input.
        match self.scenario.decline_input.clone() {
            Some(input) => {
                let mut s = self.session();
                let _ = self.initiate(p, &mut s).await;
                let request = self.authorize_request(&s, input);
                let answer = p.call(request).await;
                self.keep(&mut s, &answer);
                let ok = matches!(&answer, Ok(r) if matches!(r.outcome, Outcome::Declined { .. }));
                self.verdict(
                    "flow.decline",
                    "authorize with the scenario's decline_input is declined",
                    ok,
                    show(&answer),
                );
            }
            None => self.skip(
                "flow.decline",
                "a declining input is declined",
                "give decline_input in a scenario",
            ),
        }
    }

    async fn idempotency(&mut self, p: &Provider) {
        // authorize twice with one key: the same answer.
        let expected = "the same key twice gives the same answer";
        if let Some(mut s) = self.authorized(p, "idempotency.authorize").await {
            let mut request = self.authorize_request(&s, self.scenario.authorize_input.clone());
            request.data = s.data.clone();
            let first = p.call(request.clone()).await;
            let second = p.call(request).await;
            self.keep(&mut s, &first);
            self.keep(&mut s, &second);
            let same = match (&first, &second) {
                (Ok(a), Ok(b)) => a.outcome == b.outcome && a.reference == b.reference,
                _ => false,
            };
            self.verdict(
                "idempotency.authorize",
                expected,
                same,
                format!("{} then {}", show(&first), show(&second)),
            );
        }
        // capture twice with one key: one capture, the same answer.
        let expected = "the same key twice gives one capture and the same answer";
        if self.scenario.processor_ignores_idempotency_keys {
            self.skip(
                "idempotency.capture",
                expected,
                "the scenario says the processor behind this run ignores idempotency keys",
            );
            return;
        }
        let Some(mut s) = self.authorized(p, "idempotency.capture").await else {
            return;
        };
        let amount = self.scenario.amount / 2;
        let request = self.capture_request(&s, amount);
        let first = p.call(request.clone()).await;
        self.keep(&mut s, &first);
        let mut again = request;
        again.data = s.data.clone();
        let second = p.call(again).await;
        self.keep(&mut s, &second);
        let same = match (&first, &second) {
            (Ok(a), Ok(b)) => a.outcome == b.outcome && a.reference == b.reference,
            _ => false,
        };
        let state = self.retrieve_call(p, &s, None).await;
        let captured = state.as_ref().ok().and_then(|r| r.amount_captured);
        let got = format!(
            "{} then {}; retrieve says captured: {} (one capture is {amount})",
            show(&first),
            show(&second),
            captured.map_or("(not reported)".into(), |c| c.to_string())
        );
        let once = captured.is_none_or(|c| c == amount);
        self.verdict("idempotency.capture", expected, same && once, got);
    }

    async fn retrieve(&mut self, p: &Provider) {
        let Some(mut s) = self.authorized(p, "retrieve.after_success").await else {
            return;
        };
        // A key never sent: not attempted.
        let never = AttemptRef {
            operation: Operation::Capture,
            idempotency_key: self.key("never-sent"),
            amount: self.scenario.amount,
        };
        let answer = self.retrieve_call(p, &s, Some(never)).await;
        let ok =
            matches!(&answer, Ok(r) if matches!(r.attempt, Some(Outcome::NotAttempted { .. })));
        self.verdict(
            "retrieve.never_sent",
            "retrieve for a key never sent answers not_attempted",
            ok,
            match &answer {
                Ok(r) => format!("attempt: {:?}", r.attempt.as_ref().map(Outcome::name)),
                Err(e) => e.to_string(),
            },
        );
        // After a processed capture: processed.
        let request = self.capture_request(&s, self.scenario.amount);
        let key = request.idempotency_key.clone();
        let answer = p.call(request).await;
        self.keep(&mut s, &answer);
        if !processed(&answer) {
            self.fail(
                "retrieve.after_success",
                "a capture to be processed first",
                show(&answer),
            );
            return;
        }
        let done = AttemptRef {
            operation: Operation::Capture,
            idempotency_key: key,
            amount: self.scenario.amount,
        };
        let answer = self.retrieve_call(p, &s, Some(done)).await;
        let ok = matches!(&answer, Ok(r) if r.attempt == Some(Outcome::Processed));
        self.verdict(
            "retrieve.after_success",
            "retrieve for a processed capture's key answers processed",
            ok,
            match &answer {
                Ok(r) => format!("attempt: {:?}", r.attempt.as_ref().map(Outcome::name)),
                Err(e) => e.to_string(),
            },
        );
    }

    async fn concurrency(&mut self, p: &Arc<Provider>) {
        let n = self.scenario.concurrency.max(1);
        let expected = format!("{n} sessions initiated and authorized at once are all processed");
        let calls = (0..n).map(|i| {
            let p = p.clone();
            let scenario = self.scenario.clone();
            let tag = format!("{}-{i}", std::process::id());
            tokio::spawn(async move {
                let id = format!("ps_conformance_{}", uuid::Uuid::new_v4().simple());
                let initiated = p
                    .call(InitiateRequest {
                        session_id: id.clone(),
                        idempotency_key: format!("conformance-parallel-initiate-{tag}"),
                        amount: scenario.amount,
                        currency_code: scenario.currency.clone(),
                        context: scenario.context.clone(),
                        data: json!({}),
                        input: Value::Null,
                        account_holder: None,
                        deadline_unix_ms: None,
                    })
                    .await?;
                p.call(AuthorizeRequest {
                    session_id: id,
                    idempotency_key: format!("conformance-parallel-authorize-{tag}"),
                    amount: scenario.amount,
                    currency_code: scenario.currency.clone(),
                    context: scenario.context.clone(),
                    data: initiated.data.unwrap_or_else(|| json!({})),
                    input: scenario.authorize_input.clone(),
                    account_holder: None,
                    payment_method: None,
                    deadline_unix_ms: None,
                })
                .await
            })
        });
        let handles: Vec<_> = calls.collect();
        let mut bad = Vec::new();
        for h in handles {
            match h.await {
                Ok(answer) if processed(&answer) => {}
                Ok(answer) => bad.push(show(&answer)),
                Err(e) => bad.push(e.to_string()),
            }
        }
        let got = if bad.is_empty() {
            "all processed".to_owned()
        } else {
            format!("{} of {n} were not: {}", bad.len(), bad[0])
        };
        self.verdict("concurrency", &expected, bad.is_empty(), got);
    }

    async fn short_deadline(&mut self, p: &Provider) {
        let ms = self.scenario.short_deadline_ms;
        let expected = format!("an initiate under a {ms} ms deadline answers within it");
        let mut s = self.session();
        let request = InitiateRequest {
            session_id: s.id.clone(),
            idempotency_key: self.key("deadline"),
            amount: self.scenario.amount,
            currency_code: self.scenario.currency.clone(),
            context: self.scenario.context.clone(),
            data: json!({}),
            input: Value::Null,
            account_holder: None,
            deadline_unix_ms: None,
        };
        let started = Instant::now();
        let answer = p
            .call_with_timeout(request, Duration::from_millis(ms))
            .await;
        self.keep(&mut s, &answer);
        let took = started.elapsed();
        let ok = !matches!(answer, Err(CallError::Unknown { .. }));
        self.verdict(
            "deadline",
            &expected,
            ok,
            format!("{} after {took:.1?}", show(&answer)),
        );
    }

    async fn webhooks(&mut self, p: &Provider, m: &Manifest) {
        let now_ms = payhost::Clock::now_unix_ms(&payhost::SystemClock);
        let call = |body: String, headers: Vec<(String, String)>| {
            p.call(WebhookRequest {
                body,
                headers,
                received_at_unix_ms: now_ms,
            })
        };
        let invalid = |r: &Result<_, CallError>| matches!(r, Err(CallError::Provider(e)) if e.kind == ErrorKind::InvalidSignature);
        if !m.capabilities.webhooks {
            let answer = call("{}".into(), Vec::new()).await;
            let ok = matches!(&answer, Err(CallError::Provider(e)) if e.kind == ErrorKind::Unsupported)
                || invalid(&answer);
            self.verdict(
                "webhook.forged",
                "no webhooks declared: parse_webhook answers unsupported (or refuses the body)",
                ok,
                format!("{answer:?}"),
            );
            for name in ["webhook.valid", "webhook.stale"] {
                self.skip(name, "webhooks verify", "the manifest declares no webhooks");
            }
            return;
        }
        let body = self
            .scenario
            .webhook
            .as_ref()
            .map(|w| w.body.clone())
            .unwrap_or_else(|| {
                "{\"id\":\"evt_conformance\",\"type\":\"payment.succeeded\"}".into()
            });
        let header = self
            .scenario
            .webhook
            .as_ref()
            .map(|w| w.header.clone())
            .unwrap_or_else(|| "signature".into());
        // Forged: no signature, then a signature made with another secret.
        let unsigned = call(body.clone(), Vec::new()).await;
        let t = now_ms / 1000;
        let forged_sig = stripe_signature("not-the-secret", &body, t);
        let forged = call(body.clone(), vec![(header.clone(), forged_sig)]).await;
        let ok = invalid(&unsigned) && invalid(&forged);
        self.verdict(
            "webhook.forged",
            "an unsigned body and one signed with another secret are refused with invalid_signature",
            ok,
            format!(
                "unsigned: {}; forged: {}",
                webhook_show(&unsigned),
                webhook_show(&forged)
            ),
        );
        let Some(w) = self.scenario.webhook.clone() else {
            for name in ["webhook.valid", "webhook.stale"] {
                self.skip(
                    name,
                    "signed webhooks verify, stale ones are refused",
                    "give [webhook] (scheme, header, secret, body) in a scenario",
                );
            }
            return;
        };
        let valid = call(
            w.body.clone(),
            vec![(w.header.clone(), stripe_signature(&w.secret, &w.body, t))],
        )
        .await;
        self.verdict(
            "webhook.valid",
            "a correctly signed webhook is accepted",
            valid.is_ok(),
            webhook_show(&valid),
        );
        let tampered = call(
            format!("{} ", w.body),
            vec![(w.header.clone(), stripe_signature(&w.secret, &w.body, t))],
        )
        .await;
        let old = t - w.tolerance_s - 60;
        let stale = call(
            w.body.clone(),
            vec![(w.header.clone(), stripe_signature(&w.secret, &w.body, old))],
        )
        .await;
        self.verdict(
            "webhook.stale",
            "a signature older than the tolerance, and a changed body, are refused with invalid_signature",
            invalid(&stale) && invalid(&tampered),
            format!(
                "stale: {}; changed body: {}",
                webhook_show(&stale),
                webhook_show(&tampered)
            ),
        );
    }

    /// Account holders and saved methods: when the manifest does not declare them, one check
    /// that every such operation answers `unsupported`; else three: a customer created and
    /// read back, a method saved to it, listed, charged without card input and deleted (then
    /// neither listed nor charged), and the customer deleted.
    async fn account_holders(&mut self, p: &Provider, m: &Manifest) {
        if !m.account_holders {
            let holder = AccountHolderRef {
                id: "ach_conformance".into(),
                reference: Some("cus_conformance".into()),
                data: Value::Null,
            };
            let method = PaymentMethodRef {
                id: "pm_conformance".into(),
                reference: Some("pm_conformance".into()),
                data: Value::Null,
            };
            let unsupported = |r: Result<(), CallError>| match r {
                Err(CallError::Provider(e)) if e.kind == ErrorKind::Unsupported => None,
                other => Some(format!("{other:?}")),
            };
            let key = || "conformance-undeclared".to_owned();
            let answers = [
                (
                    Operation::CreateAccountHolder,
                    p.call(CreateAccountHolderRequest {
                        account_holder_id: holder.id.clone(),
                        idempotency_key: key(),
                        customer: Customer {
                            id: "cus_conformance".into(),
                            ..Customer::default()
                        },
                        input: Value::Null,
                        deadline_unix_ms: None,
                    })
                    .await
                    .map(drop),
                ),
                (
                    Operation::UpdateAccountHolder,
                    p.call(UpdateAccountHolderRequest {
                        account_holder: holder.clone(),
                        idempotency_key: key(),
                        customer: Customer::default(),
                        input: Value::Null,
                        deadline_unix_ms: None,
                    })
                    .await
                    .map(drop),
                ),
                (
                    Operation::DeleteAccountHolder,
                    p.call(DeleteAccountHolderRequest {
                        account_holder: holder.clone(),
                        idempotency_key: key(),
                        deadline_unix_ms: None,
                    })
                    .await
                    .map(drop),
                ),
                (
                    Operation::RetrieveAccountHolder,
                    p.call(RetrieveAccountHolderRequest {
                        account_holder: holder.clone(),
                        idempotency_key: key(),
                        attempt: None,
                        payment_method: None,
                        deadline_unix_ms: None,
                    })
                    .await
                    .map(drop),
                ),
                (
                    Operation::ListPaymentMethods,
                    p.call(ListPaymentMethodsRequest {
                        account_holder: holder.clone(),
                        idempotency_key: key(),
                        deadline_unix_ms: None,
                    })
                    .await
                    .map(drop),
                ),
                (
                    Operation::SavePaymentMethod,
                    p.call(SavePaymentMethodRequest {
                        account_holder: holder.clone(),
                        payment_method_id: method.id.clone(),
                        idempotency_key: key(),
                        input: Value::Null,
                        deadline_unix_ms: None,
                    })
                    .await
                    .map(drop),
                ),
                (
                    Operation::DeletePaymentMethod,
                    p.call(DeletePaymentMethodRequest {
                        account_holder: holder.clone(),
                        payment_method: method.clone(),
                        idempotency_key: key(),
                        deadline_unix_ms: None,
                    })
                    .await
                    .map(drop),
                ),
            ];
            let wrong: Vec<String> = answers
                .into_iter()
                .filter_map(|(op, r)| unsupported(r).map(|got| format!("{op}: {got}")))
                .collect();
            self.verdict(
                "holders.unsupported",
                "no account_holders declared: each account holder operation answers unsupported",
                wrong.is_empty(),
                wrong.join("; "),
            );
            return;
        }
        let id = format!("ach_conformance_{}", uuid::Uuid::new_v4().simple());
        let created = p
            .call(CreateAccountHolderRequest {
                account_holder_id: id.clone(),
                idempotency_key: self.key("create_account_holder"),
                customer: Customer {
                    id: format!("cus_{id}"),
                    email: Some("conformance@example.com".into()),
                    ..Customer::default()
                },
                input: Value::Null,
                deadline_unix_ms: None,
            })
            .await;
        self.keep(&mut Session::default(), &created);
        let holder = match &created {
            Ok(r) if processed(&created) && r.reference.is_some() => AccountHolderRef {
                id: id.clone(),
                reference: r.reference.clone(),
                data: r.data.clone().unwrap_or(Value::Null),
            },
            _ => {
                self.fail(
                    "holders.lifecycle",
                    "create_account_holder answers processed with the processor's id as reference",
                    show(&created),
                );
                for name in ["holders.saved_method", "holders.delete"] {
                    self.skip(
                        name,
                        "account holders work",
                        "no account holder was created",
                    );
                }
                return;
            }
        };
        let retrieved = p
            .call(RetrieveAccountHolderRequest {
                account_holder: holder.clone(),
                idempotency_key: self.key("retrieve_account_holder"),
                attempt: None,
                payment_method: None,
                deadline_unix_ms: None,
            })
            .await;
        self.verdict(
            "holders.lifecycle",
            "a created account holder (processed, with a reference) retrieves as active",
            matches!(&retrieved, Ok(r) if r.status == HolderStatus::Active),
            format!("{retrieved:?}"),
        );
        self.saved_method(p, &holder).await;
        let deleted = p
            .call(DeleteAccountHolderRequest {
                account_holder: holder.clone(),
                idempotency_key: self.key("delete_account_holder"),
                deadline_unix_ms: None,
            })
            .await;
        let after = p
            .call(RetrieveAccountHolderRequest {
                account_holder: holder.clone(),
                idempotency_key: self.key("retrieve_account_holder"),
                attempt: None,
                payment_method: None,
                deadline_unix_ms: None,
            })
            .await;
        let gone = matches!(&after, Ok(r) if matches!(r.status, HolderStatus::Deleted | HolderStatus::NotFound));
        self.verdict(
            "holders.delete",
            "delete_account_holder answers processed and the holder then retrieves as deleted or not_found",
            processed(&deleted) && gone,
            format!("delete: {}; retrieve: {after:?}", show(&deleted)),
        );
    }

    /// A method saved, listed, charged without card input, deleted and no longer listed or
    /// charged.
    async fn saved_method(&mut self, p: &Provider, holder: &AccountHolderRef) {
        const EXPECTED: &str = "a saved method (processed, with a reference) is listed, pays a \
             session without card input, and once deleted is neither listed nor charged";
        let Some(input) = self.scenario.save_input.clone() else {
            self.skip(
                "holders.saved_method",
                EXPECTED,
                "give save_input (a card or token the save accepts) in a scenario",
            );
            return;
        };
        let pm_id = format!("pm_conformance_{}", uuid::Uuid::new_v4().simple());
        let save = SavePaymentMethodRequest {
            account_holder: holder.clone(),
            payment_method_id: pm_id.clone(),
            idempotency_key: self.key("save_payment_method"),
            input,
            deadline_unix_ms: None,
        };
        let saved = p.call(save.clone()).await;
        self.keep(&mut Session::default(), &saved);
        let method = match &saved {
            Ok(r) if processed(&saved) && r.reference.is_some() => PaymentMethodRef {
                id: pm_id,
                reference: r.reference.clone(),
                data: r.data.clone().unwrap_or(Value::Null),
            },
            _ => {
                self.fail(
                    "holders.saved_method",
                    EXPECTED,
                    format!("save: {}", show(&saved)),
                );
                return;
            }
        };
        // A double that ignores idempotency keys (localstripe) would save twice: not asked.
        let again = if self.scenario.processor_ignores_idempotency_keys {
            None
        } else {
            Some(p.call(save).await)
        };
        let listed = |key: String| {
            p.call(ListPaymentMethodsRequest {
                account_holder: holder.clone(),
                idempotency_key: key,
                deadline_unix_ms: None,
            })
        };
        let before = listed(self.key("list_payment_methods")).await;
        let mut s = self.session();
        let init = self.initiate_for(p, &mut s, holder).await;
        let mut charge = self.authorize_request(&s, Value::Null);
        charge.account_holder = Some(holder.clone());
        charge.payment_method = Some(method.clone());
        let charged = p.call(charge).await;
        let removed = p
            .call(DeletePaymentMethodRequest {
                account_holder: holder.clone(),
                payment_method: method.clone(),
                idempotency_key: self.key("delete_payment_method"),
                deadline_unix_ms: None,
            })
            .await;
        let after = listed(self.key("list_payment_methods")).await;
        let mut s2 = self.session();
        let init2 = self.initiate_for(p, &mut s2, holder).await;
        let mut late = self.authorize_request(&s2, Value::Null);
        late.account_holder = Some(holder.clone());
        late.payment_method = Some(method.clone());
        let refused = p.call(late).await;
        let reference = method.reference.clone().unwrap_or_default();
        let listed_once = matches!(&before, Ok(l) if l.methods.iter().filter(|m| m.reference == reference).count() == 1);
        let not_listed =
            matches!(&after, Ok(l) if l.methods.iter().all(|m| m.reference != reference));
        let (replayed, replay_text) = match &again {
            None => (
                true,
                "not checked (the processor ignores idempotency keys)".to_owned(),
            ),
            Some(Ok(r)) if r.reference == method.reference => (true, "yes".to_owned()),
            Some(other) => (false, format!("no: {other:?}")),
        };
        let late_refused = processed(&init2)
            && matches!(&refused, Ok(r) if matches!(r.outcome, Outcome::Declined { .. }));
        // Nothing the caller typed (a card number) comes back in what may be kept.
        let typed = long_digit_runs(&self.scenario.save_input.clone().unwrap_or_default());
        let kept = format!("{saved:?} {before:?} {after:?}");
        let leaked: Vec<&String> = typed.iter().filter(|d| kept.contains(d.as_str())).collect();
        self.verdict(
            "holders.saved_method",
            EXPECTED,
            listed_once
                && replayed
                && leaked.is_empty()
                && processed(&init)
                && processed(&charged)
                && processed(&removed)
                && not_listed
                && late_refused,
            format!(
                "listed once: {listed_once}; repeated save key replayed: {replay_text}; card \
                 digits in what is kept: {}; initiate: {}; charge: {}; delete: {}; listed after \
                 delete: {}; charge after delete (must be declined): {}",
                leaked.len(),
                show(&init),
                show(&charged),
                show(&removed),
                !not_listed,
                show(&refused)
            ),
        );
    }

    /// Initiates a session that belongs to `holder`.
    async fn initiate_for(
        &mut self,
        p: &Provider,
        s: &mut Session,
        holder: &AccountHolderRef,
    ) -> Answer {
        let request = InitiateRequest {
            session_id: s.id.clone(),
            idempotency_key: self.key("initiate"),
            amount: self.scenario.amount,
            currency_code: self.scenario.currency.clone(),
            context: self.scenario.context.clone(),
            data: s.data.clone(),
            input: Value::Null,
            account_holder: Some(holder.clone()),
            deadline_unix_ms: None,
        };
        let answer = p.call(request).await;
        self.keep(s, &answer);
        answer
    }

    async fn latency(&mut self, p: &Provider) {
        let mut samples = Vec::with_capacity(100);
        for _ in 0..100 {
            let mut s = self.session();
            let started = Instant::now();
            let answer = self.initiate(p, &mut s).await;
            samples.push(started.elapsed());
            if !processed(&answer) {
                self.fail("latency", "100 initiates answer", show(&answer));
                return;
            }
        }
        samples.sort();
        let p50 = samples[samples.len() / 2];
        let p99 = samples[samples.len() * 99 / 100];
        let timeout = Duration::from_millis(self.scenario.timeout_ms);
        self.verdict(
            "latency",
            "initiate's p99 stays well inside the deadline (under half of it)",
            p99 < timeout / 2,
            format!("p50 {p50:.1?}, p99 {p99:.1?} over 100 calls"),
        );
    }

    fn secrets(&mut self, secrets: &[String], logs: &str, answers: &[String]) {
        let expected = "no secret option value in any log line or answer";
        if secrets.is_empty() {
            self.skip(
                "secrets.not_logged",
                expected,
                "no option looks like a secret (name one with `secrets` in a scenario)",
            );
            return;
        }
        // The host redacts a secret a provider logs, and says it did: that is still a leak.
        let in_logs = secrets.iter().any(|s| logs.contains(s.as_str()))
            || logs.contains(payhost::plugins::SECRET_REDACTED);
        let in_answers = secrets
            .iter()
            .any(|s| answers.iter().any(|a| a.contains(s.as_str())));
        let got = match (in_logs, in_answers) {
            (false, false) => format!("none of {} secret value(s) appeared", secrets.len()),
            (true, _) => "a secret option value appeared in a log line".to_owned(),
            (false, true) => "a secret option value appeared in an answer".to_owned(),
        };
        self.verdict("secrets.not_logged", expected, !in_logs && !in_answers, got);
    }
}

/// Runs of 12 or more digits in `value` (card numbers), to look for where they must not be.
fn long_digit_runs(value: &Value) -> Vec<String> {
    let text = value.to_string();
    text.split(|c: char| !c.is_ascii_digit())
        .filter(|run| run.len() >= 12)
        .map(str::to_owned)
        .collect()
}

fn processed(answer: &Answer) -> bool {
    matches!(answer, Ok(r) if r.outcome == Outcome::Processed)
}

fn webhook_show<T: std::fmt::Debug>(r: &Result<T, CallError>) -> String {
    match r {
        Ok(_) => "accepted".into(),
        Err(CallError::Provider(e)) => format!("{}: {}", e.kind.code(), e.message),
        Err(e) => e.to_string(),
    }
}

/// `t=<t>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, Stripe's webhook signature.
fn stripe_signature(secret: &str, body: &str, t: i64) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::{Scratch, write_private};

    /// The options `provider test` hands the loader hold secrets: their folder and file are the
    /// user's alone, whatever the umask.
    #[test]
    fn the_generated_config_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let scratch = Scratch::new().unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&scratch.0), 0o700);
        let file = scratch.0.join("payhost.toml");
        write_private(&file, "api_key = \"sk_live_x\"").unwrap();
        assert_eq!(mode(&file), 0o600);
        write_private(&file, "again").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "again");
        assert_eq!(mode(&file), 0o600);
    }
}
