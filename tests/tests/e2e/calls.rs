//! Calling real plugins through the library API: panics, deadlines, concurrency limits, logs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use payhost::CallError;
use payhost_e2e::{BOTH, Scratch};
use payhost_provider_api::{AuthorizeRequest, ErrorKind, InitiateRequest, Outcome};
use serde_json::{Value, json};

fn authorize(session: &str, key: &str, data: Value) -> AuthorizeRequest {
    AuthorizeRequest {
        session_id: session.into(),
        idempotency_key: key.into(),
        amount: 1000,
        currency_code: "eur".into(),
        context: Value::Null,
        data,
        input: Value::Null,
        account_holder: None,
        payment_method: None,
        deadline_unix_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_panics_in_authorize_gives_a_typed_error_and_the_next_call_works() {
    let s = Scratch::new();
    let (_config, report) = s.load(BOTH);
    let sandbox = report.providers.get("sandbox").unwrap();

    let err = sandbox
        .call(authorize(
            "ps_panic",
            "k1",
            json!({"sandbox": {"authorize": "panic"}}),
        ))
        .await
        .unwrap_err();
    match &err {
        CallError::Provider(e) => {
            assert_eq!(e.kind, ErrorKind::Panic);
            assert!(e.message.contains("panic requested for authorize"), "{e}");
        }
        other => panic!("expected a panic error, got {other:?}"),
    }
    assert_eq!(err.code(), "provider.panic");
    assert!(
        err.outcome_is_unknown(),
        "a panic mid-call may have moved money"
    );

    let ok = sandbox
        .call(authorize("ps_panic", "k2", Value::Null))
        .await
        .unwrap();
    assert_eq!(ok.outcome, Outcome::Processed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_comes_back_unknown_promptly() {
    let s = Scratch::new();
    let (_config, report) = s.load(BOTH); // sandbox timeout_ms = 500
    let sandbox = report.providers.get("sandbox").unwrap();
    let started = Instant::now();
    let err = sandbox
        .call(authorize(
            "ps_slow",
            "slow-1",
            json!({"sandbox": {"authorize": {"delay_ms": 3000}}}),
        ))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, CallError::Unknown { .. }), "{err:?}");
    assert!(err.to_string().contains("500 ms"), "{err}");
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_millis(500 + 400),
        "took {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overrunning_call_keeps_its_slot_so_the_limit_holds_and_later_calls_are_not_attempted() {
    let s = Scratch::new();
    let (_config, report) = s.load(&BOTH.replace("max_concurrency = 4", "max_concurrency = 1"));
    let sandbox = report.providers.get("sandbox").unwrap();
    let slow = sandbox.call(authorize(
        "ps_busy",
        "busy-1",
        json!({"sandbox": {"authorize": {"delay_ms": 1500}}}),
    ));
    let err = slow.await.unwrap_err();
    assert!(matches!(err, CallError::Unknown { .. }));
    assert_eq!(
        sandbox.calls_in_progress(),
        1,
        "the overrunning call still runs"
    );

    let err = sandbox
        .call(authorize("ps_busy2", "busy-2", Value::Null))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::NotAttempted { .. }), "{err:?}");
    assert!(!err.outcome_is_unknown());

    // Once the slow call returns, its slot is free again.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(sandbox.calls_in_progress(), 0);
    let ok = sandbox
        .call(authorize("ps_busy2", "busy-3", Value::Null))
        .await
        .unwrap();
    assert_eq!(ok.outcome, Outcome::Processed);
}

/// Collects formatted log lines.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_providers_tracing_events_reach_the_host_tagged_with_the_provider_id() {
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // Global: the provider is called from the runtime's blocking threads.
    tracing::subscriber::set_global_default(subscriber).expect("no other subscriber in this test");
    {
        let s = Scratch::new();
        // Two instances of one library with different options: each logs under its own id.
        let (_c, report) = s.load(&format!(
            "{BOTH}\n[providers.sandbox_eu]\nlibrary = \"payhost_provider_sandbox\"\n[providers.sandbox_eu.options]\nstate_dir = \"{{state}}\"\nwebhook_secret = \"whsec_eu_secret\"\n"
        ));
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        assert_eq!(report.providers.len(), 3);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let eu = report.providers.get("sandbox_eu").unwrap();
            eu.call(authorize(
                "ps_log",
                "log-1",
                json!({"sandbox": {"authorize": "panic"}}),
            ))
            .await
            .unwrap_err();
        });
    }
    let out = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let ready: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("sandbox ready"))
        .collect();
    assert!(
        ready
            .iter()
            .any(|l| l.contains("provider=\"sandbox\"") || l.contains("provider=sandbox ")),
        "{out}"
    );
    assert!(ready.iter().any(|l| l.contains("sandbox_eu")), "{out}");
    let panic_line = out
        .lines()
        .find(|l| l.contains("provider panicked: sandbox: panic requested"))
        .unwrap_or_else(|| panic!("the panic was not reported through the host:\n{out}"));
    assert!(panic_line.contains("sandbox_eu"), "{panic_line}");
    assert!(panic_line.contains("ERROR"), "{panic_line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_provider_answers_across_the_boundary() {
    let s = Scratch::new();
    let (_config, report) = s.load(BOTH);
    let system = report.providers.get("system").unwrap();
    let answer = system
        .call(InitiateRequest {
            session_id: "ps_sys".into(),
            idempotency_key: "init-1".into(),
            amount: 500,
            currency_code: "usd".into(),
            context: Value::Null,
            data: Value::Null,
            input: Value::Null,
            account_holder: None,
            deadline_unix_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(answer.outcome, Outcome::Processed);
    let err = system
        .call(authorize("ps_sys", "a-0", Value::Null).with_amount(0))
        .await
        .unwrap_err();
    match err {
        CallError::Provider(e) => {
            assert_eq!(e.kind, ErrorKind::InvalidRequest);
            assert_eq!(e.param.as_deref(), Some("amount"));
        }
        other => panic!("{other:?}"),
    }
}

trait WithAmount {
    fn with_amount(self, amount: i64) -> Self;
}

impl WithAmount for AuthorizeRequest {
    fn with_amount(mut self, amount: i64) -> Self {
        self.amount = amount;
        self
    }
}

#[test]
fn a_library_replaced_on_disk_after_loading_is_refused_until_restart() {
    use payhost::config::{LibrarySource, ProviderSettings};
    let s = Scratch::new();
    let path = s.dir.path().join("libswap.so");
    std::fs::copy(payhost_e2e::library("payhost_provider_system"), &path).unwrap();
    let settings = ProviderSettings {
        id: "swap".into(),
        library: LibrarySource::Path(path.clone()),
        enabled: true,
        sha256: None,
        timeout: Duration::from_secs(5),
        max_concurrency: 1,
        resend_unknown: true,
        webhook_rate: payhost::config::DEFAULT_WEBHOOK_RATE,
        isolation: payhost::config::Isolation::InProcess,
        max_memory_mb: None,
        kill_after: Duration::from_secs(2),
        http_max_response_bytes: payhost::config::DEFAULT_HTTP_MAX_RESPONSE_BYTES,
        options: json!({}),
    };
    let loader = payhost::Loader::with_plugin_dir(s.dir.path());
    let first = loader.load(&settings, None).unwrap();
    // A second instance of the unchanged file reuses the loaded library.
    let again = loader.load(&settings, None).unwrap();
    assert_eq!(first.library(), again.library());

    // Replace the file by rename (as an upgrade should not: same name), never in place.
    let other = s.dir.path().join("libother.so");
    std::fs::copy(payhost_e2e::library("payhost_provider_sandbox"), &other).unwrap();
    std::fs::rename(&other, &path).unwrap();
    let err = loader.load(&settings, None).unwrap_err();
    assert_eq!(err.code(), "plugin.changed_on_disk");
    assert!(err.to_string().contains(&first.library().sha256), "{err}");
}

#[test]
fn a_library_swapped_between_its_pin_check_and_its_load_is_not_the_one_loaded() {
    use payhost::config::{LibrarySource, ProviderSettings};
    use sha2::Digest;
    let s = Scratch::new();
    let path = s.dir.path().join("libpinned.so");
    std::fs::copy(payhost_e2e::library("payhost_provider_system"), &path).unwrap();
    let pin = hex::encode(sha2::Sha256::digest(std::fs::read(&path).unwrap()));
    let impostor = s.dir.path().join("impostor.so");
    std::fs::copy(payhost_e2e::library("payhost_provider_sandbox"), &impostor).unwrap();
    let settings = ProviderSettings {
        id: "pinned".into(),
        library: LibrarySource::Path(path.clone()),
        enabled: true,
        sha256: Some(pin),
        timeout: Duration::from_secs(5),
        max_concurrency: 1,
        resend_unknown: true,
        webhook_rate: payhost::config::DEFAULT_WEBHOOK_RATE,
        isolation: payhost::config::Isolation::InProcess,
        max_memory_mb: None,
        kill_after: Duration::from_secs(2),
        http_max_response_bytes: payhost::config::DEFAULT_HTTP_MAX_RESPONSE_BYTES,
        options: json!({}),
    };
    // Right after the pin matched, another file takes the library's place.
    let swapped = Arc::new(Mutex::new(false));
    let flag = swapped.clone();
    let loader = payhost::Loader::with_plugin_dir(s.dir.path()).after_check(move |p| {
        std::fs::rename(&impostor, p).unwrap();
        *flag.lock().unwrap() = true;
    });
    let provider = loader
        .load(&settings, None)
        .expect("the file that was checked loads");
    assert!(*swapped.lock().unwrap(), "the swap happened");
    assert_eq!(
        provider.manifest().id,
        "system",
        "the library loaded is the one whose digest was pinned"
    );
}
