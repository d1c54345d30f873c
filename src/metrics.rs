//! Prometheus metrics. Code anywhere records through the `metrics` facade with these helpers
//! (names and labels live here, nowhere else); `GET /metrics` renders them with
//! metrics-exporter-prometheus after refreshing the gauges that are read from the store.
//!
//! Every series carries `integration`. Label values come from configuration or from a small
//! fixed set, never from request input, so a hostile caller cannot grow the series count.

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Installs the process-wide recorder once; None when another recorder was installed first
/// (an embedding program's), in which case metrics go there.
pub fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        "rostersync_reconcile_duration_seconds".into(),
                    ),
                    &[0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0],
                )
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    Some(handle)
                }
                Err(_) => {
                    tracing::warn!("a metrics recorder was already installed; /metrics is empty");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "rostersync_notifications_received_total",
        "Graph notifications accepted and queued"
    );
    describe_counter!(
        "rostersync_notifications_rejected_total",
        "Graph notifications not queued, by reason"
    );
    describe_gauge!(
        "rostersync_queue_depth",
        "Items waiting in the notification queue (including retries)"
    );
    describe_gauge!("rostersync_dead_letters", "Items in the dead-letter tree");
    describe_counter!(
        "rostersync_applies_total",
        "Changes sent to the LMS, by kind and outcome"
    );
    describe_histogram!(
        "rostersync_reconcile_duration_seconds",
        Unit::Seconds,
        "Full reconcile duration"
    );
    describe_counter!(
        "rostersync_reconcile_runs_total",
        "Full reconciles by outcome"
    );
    describe_gauge!(
        "rostersync_reconcile_last_success_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the last reconcile that ended ok or partial"
    );
    describe_counter!(
        "rostersync_graph_requests_total",
        "Microsoft Graph responses by status (error: no response)"
    );
    describe_counter!(
        "rostersync_target_requests_total",
        "LMS (SCIM) responses by status (error: no response)"
    );
    describe_gauge!(
        "rostersync_client_secret_expiry_seconds",
        Unit::Seconds,
        "Seconds until client_secret_expires (negative: expired); only when configured"
    );
    describe_gauge!(
        "rostersync_subscription_expiry_seconds",
        Unit::Seconds,
        "Seconds until a Graph subscription expires (negative: expired)"
    );
}

/// A notification was queued.
pub(crate) fn notifications_received(integration: &str, n: u64) {
    counter!("rostersync_notifications_received_total", "integration" => integration.to_string())
        .increment(n);
}

/// A notification (or a whole request) was refused. `integration` must be a configured name
/// or "(unknown)"; `reason` one of a fixed set.
pub(crate) fn notification_rejected(integration: &str, reason: &'static str) {
    notifications_rejected(integration, reason, 1);
}

/// `n` notifications (or requests) refused for one reason.
pub(crate) fn notifications_rejected(integration: &str, reason: &'static str, n: u64) {
    counter!(
        "rostersync_notifications_rejected_total",
        "integration" => integration.to_string(),
        "reason" => reason
    )
    .increment(n);
}

/// One change sent to the LMS (create, update, deactivate, reactivate) and how it ended.
pub(crate) fn apply(integration: &str, kind: &'static str, ok: bool) {
    counter!(
        "rostersync_applies_total",
        "integration" => integration.to_string(),
        "kind" => kind,
        "outcome" => if ok { "ok" } else { "failed" }
    )
    .increment(1);
}

/// A full reconcile ended.
pub(crate) fn reconcile_finished(
    integration: &str,
    seconds: f64,
    outcome: &'static str,
    success: bool,
) {
    let i = integration.to_string();
    histogram!("rostersync_reconcile_duration_seconds", "integration" => i.clone()).record(seconds);
    counter!("rostersync_reconcile_runs_total", "integration" => i, "outcome" => outcome)
        .increment(1);
    if success {
        last_success_at(integration, chrono::Utc::now().timestamp());
    }
}

/// The last successful reconcile known from the run history (set when `serve` starts, so the
/// gauge exists before the next run).
pub(crate) fn last_success_at(integration: &str, unix_seconds: i64) {
    gauge!("rostersync_reconcile_last_success_timestamp_seconds", "integration" => integration.to_string())
        .set(unix_seconds as f64);
}

/// Which remote a request went to.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Remote {
    Graph,
    Target,
}

/// One HTTP response (or `None`: no response) from Graph or the LMS, retries included.
pub(crate) fn request(remote: Remote, integration: &str, status: Option<u16>) {
    let name = match remote {
        Remote::Graph => "rostersync_graph_requests_total",
        Remote::Target => "rostersync_target_requests_total",
    };
    let status = match status {
        Some(s) => s.to_string(),
        None => "error".to_string(),
    };
    counter!(name, "integration" => integration.to_string(), "status" => status).increment(1);
}

/// Gauges read from the store when `/metrics` is scraped.
pub(crate) fn queue(integration: &str, depth: u64, dead: u64) {
    gauge!("rostersync_queue_depth", "integration" => integration.to_string()).set(depth as f64);
    gauge!("rostersync_dead_letters", "integration" => integration.to_string()).set(dead as f64);
}

pub(crate) fn secret_expiry(integration: &str, seconds: f64) {
    gauge!("rostersync_client_secret_expiry_seconds", "integration" => integration.to_string())
        .set(seconds);
}

pub(crate) fn subscription_expiry(integration: &str, resource: &str, seconds: f64) {
    gauge!(
        "rostersync_subscription_expiry_seconds",
        "integration" => integration.to_string(),
        "resource" => resource.to_string()
    )
    .set(seconds);
}

/// The Prometheus text exposition of everything recorded so far.
pub(crate) fn render() -> String {
    handle().map(|h| h.render()).unwrap_or_default()
}
