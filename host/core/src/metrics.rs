//! Prometheus metrics: HTTP requests, provider-call latency by provider, operation and outcome,
//! and attempts by state. One registry per process; `GET /metrics` renders it.

use std::sync::OnceLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    /// `payhost_http_requests_total{method,route,status}`.
    pub http_requests: IntCounterVec,
    /// `payhost_http_request_duration_seconds{method,route}`.
    pub http_duration: HistogramVec,
    /// `payhost_provider_call_duration_seconds{provider,operation,outcome}`.
    pub provider_calls: HistogramVec,
    /// `payhost_attempts_open{state}`, refreshed at every scrape.
    pub attempts_open: IntGaugeVec,
    /// `payhost_event_deliveries_parked`: deliveries parked after their retry period (refreshed
    /// at every scrape; up to 10,000 are counted).
    pub deliveries_parked: prometheus::IntGauge,
    /// `payhost_webhooks_total{provider,result}`.
    pub webhooks: IntCounterVec,
    /// `payhost_provider_http_duration_seconds{provider,outcome}`: requests the host sent for
    /// providers.
    pub provider_http: HistogramVec,
    /// `payhost_http_connections_cut_total{reason}`: connections closed by the edge
    /// (`header_timeout`, `body_timeout`, `idle_timeout`).
    pub http_connections_cut: IntCounterVec,
    /// `payhost_http_connections_open{listener}`.
    pub http_connections_open: IntGaugeVec,
    /// `payhost_http_connection_limit{listener}`: connections served at once at most.
    pub http_connection_limit: IntGaugeVec,
    /// `payhost_attempt_takeovers_total`: attempts taken over from a host whose lease lapsed.
    pub attempt_takeovers: prometheus::IntCounter,
    /// `payhost_hosts{state}`: hosts on the shared store, `live` or `expired`, at every scrape.
    pub hosts: IntGaugeVec,
    /// `payhost_lease_lost_total`: times this host found its lease lapsed.
    pub lease_lost: prometheus::IntCounter,
    /// `payhost_store_errors_total{code}`.
    pub store_errors: IntCounterVec,
    /// `payhost_store_up`: 1 while the store answers, 0 from its first failure to its recovery.
    pub store_up: prometheus::IntGauge,
    /// `payhost_store_outage_seconds_total`: time the store spent unreachable.
    pub store_outage_seconds: prometheus::Counter,
    /// When the current outage began.
    store_down_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// `payhost_owed_writes`: writes the host owes the store, waiting for it to answer.
    pub owed_writes: prometheus::IntGauge,
    /// `payhost_worker_restarts_total{provider}`: isolated providers' workers that died.
    pub worker_restarts: IntCounterVec,
    /// `payhost_worker_kills_total{provider}`: workers killed for a call past its deadline.
    pub worker_kills: IntCounterVec,
    /// `payhost_worker_stderr_dropped_bytes_total{provider}`: bytes of a worker's stderr not
    /// forwarded to the log (past the per-line or per-second bound).
    pub worker_stderr_dropped: IntCounterVec,
    /// `payhost_plugin_limits_total{provider,limit}`: what the host refused or cut for a plugin
    /// (`host_calls`, `http_response_bytes`, `answer_bytes`, `data_bytes`).
    pub plugin_limits: IntCounterVec,
    /// `payhost_provider_healthy{provider}`: 0 while an isolated provider's worker crash-loops.
    pub provider_healthy: IntGaugeVec,
    /// `payhost_event_deliveries_seconds{endpoint,outcome}`: tries to POST an event
    /// (delivered, failed, parked) and how long each took.
    pub event_deliveries: HistogramVec,
    /// `payhost_config_reloads_total{result}`: reloads asked for, by what came of them
    /// (`applied`, `unchanged`, `invalid`, `restart_needed`).
    pub config_reloads: IntCounterVec,
}

const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "payhost_http_requests_total",
                "HTTP requests by route and status",
            ),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "payhost_http_request_duration_seconds",
                "HTTP request latency by route",
            )
            .buckets(BUCKETS.to_vec()),
            &["method", "route"],
        )
        .expect("valid metric");
        let provider_calls = HistogramVec::new(
            HistogramOpts::new(
                "payhost_provider_call_duration_seconds",
                "Provider call latency by provider, operation and outcome",
            )
            .buckets(BUCKETS.to_vec()),
            &["provider", "operation", "outcome"],
        )
        .expect("valid metric");
        let attempts_open = IntGaugeVec::new(
            Opts::new(
                "payhost_attempts_open",
                "Attempts whose outcome is open, by state",
            ),
            &["state"],
        )
        .expect("valid metric");
        let deliveries_parked = prometheus::IntGauge::new(
            "payhost_event_deliveries_parked",
            "Event deliveries parked after their retry period (payhost events failed lists them)",
        )
        .expect("valid metric");
        let webhooks = IntCounterVec::new(
            Opts::new(
                "payhost_webhooks_total",
                "Webhooks received, by provider and result",
            ),
            &["provider", "result"],
        )
        .expect("valid metric");
        let provider_http = HistogramVec::new(
            HistogramOpts::new(
                "payhost_provider_http_duration_seconds",
                "HTTP requests sent for providers, by provider and outcome",
            )
            .buckets(BUCKETS.to_vec()),
            &["provider", "outcome"],
        )
        .expect("valid metric");
        let http_connections_cut = IntCounterVec::new(
            Opts::new(
                "payhost_http_connections_cut_total",
                "Connections the server closed because a clock ran out, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let http_connections_open = IntGaugeVec::new(
            Opts::new(
                "payhost_http_connections_open",
                "Connections open now, by listener",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let http_connection_limit = IntGaugeVec::new(
            Opts::new(
                "payhost_http_connection_limit",
                "Connections served at once at most, by listener",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let attempt_takeovers = prometheus::IntCounter::new(
            "payhost_attempt_takeovers_total",
            "Attempts taken over from a host whose lease lapsed",
        )
        .expect("valid metric");
        let hosts = IntGaugeVec::new(
            Opts::new("payhost_hosts", "Hosts on the shared store, by lease state"),
            &["state"],
        )
        .expect("valid metric");
        let lease_lost = prometheus::IntCounter::new(
            "payhost_lease_lost_total",
            "Times this host found its lease lapsed and registered again",
        )
        .expect("valid metric");
        let store_errors = IntCounterVec::new(
            Opts::new("payhost_store_errors_total", "Store failures, by code"),
            &["code"],
        )
        .expect("valid metric");
        let store_up = prometheus::IntGauge::new("payhost_store_up", "Whether the store answers")
            .expect("valid metric");
        store_up.set(1);
        let store_outage_seconds = prometheus::Counter::new(
            "payhost_store_outage_seconds_total",
            "Time the store spent unreachable",
        )
        .expect("valid metric");
        let owed_writes = prometheus::IntGauge::new(
            "payhost_owed_writes",
            "Writes waiting for the store to answer (released claims, known outcomes, completed keys)",
        )
        .expect("valid metric");
        let worker_restarts = IntCounterVec::new(
            Opts::new(
                "payhost_worker_restarts_total",
                "Worker processes of isolated providers that died and were restarted",
            ),
            &["provider"],
        )
        .expect("valid metric");
        let worker_kills = IntCounterVec::new(
            Opts::new(
                "payhost_worker_kills_total",
                "Workers killed because a call overran its deadline by the kill margin",
            ),
            &["provider"],
        )
        .expect("valid metric");
        let worker_stderr_dropped = IntCounterVec::new(
            Opts::new(
                "payhost_worker_stderr_dropped_bytes_total",
                "Bytes of a worker's stderr not forwarded to the log (over the per-line or per-second bound)",
            ),
            &["provider"],
        )
        .expect("valid metric");
        let plugin_limits = IntCounterVec::new(
            Opts::new(
                "payhost_plugin_limits_total",
                "Requests, answers and bodies of a plugin the host refused or cut at its bounds",
            ),
            &["provider", "limit"],
        )
        .expect("valid metric");
        let provider_healthy = IntGaugeVec::new(
            Opts::new(
                "payhost_provider_healthy",
                "1 while a provider serves, 0 while its worker crash-loops",
            ),
            &["provider"],
        )
        .expect("valid metric");
        let event_deliveries = HistogramVec::new(
            HistogramOpts::new(
                "payhost_event_deliveries_seconds",
                "Tries to POST an event to an endpoint, by outcome (delivered, failed, parked)",
            )
            .buckets(BUCKETS.to_vec()),
            &["endpoint", "outcome"],
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "payhost_config_reloads_total",
                "Config reloads asked for (SIGHUP, payhost reload, POST /v1/admin/reload), by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        for c in [
            Box::new(worker_restarts.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(config_reloads.clone()),
            Box::new(event_deliveries.clone()),
            Box::new(worker_kills.clone()),
            Box::new(worker_stderr_dropped.clone()),
            Box::new(plugin_limits.clone()),
            Box::new(provider_healthy.clone()),
            Box::new(store_errors.clone()),
            Box::new(store_up.clone()),
            Box::new(store_outage_seconds.clone()),
            Box::new(owed_writes.clone()),
            Box::new(attempt_takeovers.clone()),
            Box::new(hosts.clone()),
            Box::new(lease_lost.clone()),
            Box::new(http_connections_cut.clone()),
            Box::new(http_connections_open.clone()),
            Box::new(http_connection_limit.clone()),
            Box::new(provider_http.clone()),
            Box::new(http_requests.clone()),
            Box::new(http_duration.clone()),
            Box::new(provider_calls.clone()),
            Box::new(attempts_open.clone()),
            Box::new(deliveries_parked.clone()),
            Box::new(webhooks.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Metrics {
            registry,
            http_requests,
            http_duration,
            provider_calls,
            attempts_open,
            deliveries_parked,
            webhooks,
            provider_http,
            http_connections_cut,
            http_connections_open,
            http_connection_limit,
            attempt_takeovers,
            hosts,
            lease_lost,
            store_errors,
            store_up,
            store_outage_seconds,
            store_down_since: std::sync::Mutex::new(None),
            owed_writes,
            worker_restarts,
            worker_kills,
            worker_stderr_dropped,
            plugin_limits,
            provider_healthy,
            event_deliveries,
            config_reloads,
        }
    }

    /// One try to deliver an event to `endpoint`.
    pub fn event_delivered(&self, endpoint: &str, outcome: &str, took: std::time::Duration) {
        self.event_deliveries
            .with_label_values(&[endpoint, outcome])
            .observe(took.as_secs_f64());
    }

    /// The store failed: counted, and an outage begins if none is on.
    pub fn store_failed(&self, code: &str) {
        self.store_errors.with_label_values(&[code]).inc();
        let mut since = self
            .store_down_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if since.is_none() {
            *since = Some(std::time::Instant::now());
            self.store_up.set(0);
            tracing::error!("the store stopped answering");
        }
    }

    /// The store answered: an outage on ends, and its length is counted.
    pub fn store_ok(&self) {
        let mut since = self
            .store_down_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(began) = since.take() {
            let lasted = began.elapsed();
            self.store_outage_seconds.inc_by(lasted.as_secs_f64());
            self.store_up.set(1);
            tracing::warn!(
                outage_ms = lasted.as_millis() as u64,
                "the store answers again"
            );
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
