//! ccnoded's Prometheus metrics. docs/metrics.md lists every series.
//!
//! One registry per daemon, passed explicitly; no global registry. Label
//! values come from closed sets (states, command names, error codes), never
//! from what a peer sent.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::state::NodeState;

/// Every metric ccnoded exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub node_state: IntGaugeVec,
    pub node_state_changed: IntGauge,
    pub admin_requests: IntCounterVec,
    pub admin_refused: IntCounterVec,
    pub admin_connections: IntGauge,
    pub http_requests: IntCounterVec,
    pub http_refused: IntCounter,
    pub state_write_failures: IntCounter,
    pub audit_write_failures: IntCounter,
    pub sandbox: IntGaugeVec,
    pub attestations: IntCounterVec,
    pub attestation_seconds: Histogram,
    pub attestation_batch_size: Histogram,
    pub api_requests: IntCounterVec,
    pub api_refused: IntCounter,
    pub api_time_to_first_token: HistogramVec,
    pub api_inter_token: HistogramVec,
    pub api_tokens_generated: IntCounterVec,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique and valid");
    c
}

impl Metrics {
    /// The registry, for subsystems that register their own series.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn new(node_id: &str) -> Metrics {
        let registry = Registry::new();
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "ccnode_build_info",
                    "Build of the running ccnoded; always 1.",
                ),
                &["version", "node"],
            )
            .expect("valid metric"),
        );
        build_info
            .with_label_values(&[crate::VERSION, node_id])
            .set(1);
        let node_state = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "ccnode_node_state",
                    "Node lifecycle state: 1 for the current state, 0 for the others.",
                ),
                &["state"],
            )
            .expect("valid metric"),
        );
        for s in NodeState::ALL {
            node_state.with_label_values(&[s.as_str()]).set(0);
        }
        let node_state_changed = register(
            &registry,
            IntGauge::new(
                "ccnode_node_state_changed_timestamp_seconds",
                "Unix time of the last node state transition.",
            )
            .expect("valid metric"),
        );
        let admin_requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "ccnode_admin_requests_total",
                    "Admin socket requests by command and result (ok or error code).",
                ),
                &["command", "result"],
            )
            .expect("valid metric"),
        );
        let admin_refused = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "ccnode_admin_refused_connections_total",
                    "Admin socket connections refused, by reason.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        for reason in ["unauthorized", "connection_limit", "peer_credentials"] {
            admin_refused.with_label_values(&[reason]).reset();
        }
        let admin_connections = register(
            &registry,
            IntGauge::new(
                "ccnode_admin_connections",
                "Admin socket connections being served.",
            )
            .expect("valid metric"),
        );
        let http_requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "ccnode_http_requests_total",
                    "HTTP requests on the metrics endpoint, by handler and status code.",
                ),
                &["handler", "code"],
            )
            .expect("valid metric"),
        );
        let http_refused = register(
            &registry,
            IntCounter::new(
                "ccnode_http_refused_connections_total",
                "HTTP connections closed on accept because the connection cap was reached.",
            )
            .expect("valid metric"),
        );
        let state_write_failures = register(
            &registry,
            IntCounter::new(
                "ccnode_state_write_failures_total",
                "Failed writes of the persistent node state.",
            )
            .expect("valid metric"),
        );
        let audit_write_failures = register(
            &registry,
            IntCounter::new(
                "ccnode_audit_write_failures_total",
                "Failed appends to the audit log.",
            )
            .expect("valid metric"),
        );
        let sandbox = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "ccnode_sandbox_support",
                    "What the host offers worker sandboxes: landlock_abi (the kernel's Landlock ABI), \
                     landlock_required_abi, landlock_ok (1 if workers can start under the policy), \
                     cgroup_limits (1 if workers get cgroup v2 memory and pids limits), \
                     device_cgroup (1 if each worker gets its own device allow-list, v1 or v2).",
                ),
                &["feature"],
            )
            .expect("valid metric"),
        );
        let attestations = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "ccnode_attestations_total",
                    "Attestation requests by result: ok, or the error code answered.",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        let attestation_seconds = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "ccnode_attestation_seconds",
                    "Time to produce evidence (waiting for the TPM, the quote, the TEE report).",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )
            .expect("valid metric"),
        );
        let attestation_batch_size = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "ccnode_attestation_batch_size",
                    "Verifiers answered by one quote.",
                )
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
                ]),
            )
            .expect("valid metric"),
        );
        let api_requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "ccnode_api_requests_total",
                    "OpenAI API requests by model (a configured model id, or unknown), endpoint and status code.",
                ),
                &["model", "endpoint", "status"],
            )
            .expect("valid metric"),
        );
        let api_refused = register(
            &registry,
            IntCounter::new(
                "ccnode_api_refused_connections_total",
                "OpenAI API connections closed on accept because api.max_connections was reached.",
            )
            .expect("valid metric"),
        );
        let api_time_to_first_token = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "ccnode_api_time_to_first_token_seconds",
                    "Time from a generation's acceptance to its first token (queueing and prefill).",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0,
                ]),
                &["model"],
            )
            .expect("valid metric"),
        );
        let api_inter_token = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "ccnode_api_inter_token_seconds",
                    "Time between consecutive token pieces of a generation.",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5,
                ]),
                &["model"],
            )
            .expect("valid metric"),
        );
        let api_tokens_generated = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "ccnode_api_tokens_generated_total",
                    "Completion tokens of generations that finished, by model.",
                ),
                &["model"],
            )
            .expect("valid metric"),
        );
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics register once");
        Metrics {
            registry,
            node_state,
            node_state_changed,
            admin_requests,
            admin_refused,
            admin_connections,
            http_requests,
            http_refused,
            state_write_failures,
            audit_write_failures,
            sandbox,
            attestations,
            attestation_seconds,
            attestation_batch_size,
            api_requests,
            api_refused,
            api_time_to_first_token,
            api_inter_token,
            api_tokens_generated,
        }
    }

    /// Sets the state gauges: 1 for `state`, 0 for every other.
    pub fn set_node_state(&self, state: NodeState, since_unix: i64) {
        for s in NodeState::ALL {
            self.node_state
                .with_label_values(&[s.as_str()])
                .set(i64::from(s == state));
        }
        self.node_state_changed.set(since_unix);
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> (Vec<u8>, &'static str) {
        let mut out = Vec::with_capacity(8 * 1024);
        let encoder = TextEncoder::new();
        encoder
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        (out, prometheus::TEXT_FORMAT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_state_is_set() {
        let m = Metrics::new("n1");
        m.set_node_state(NodeState::Drained, 1_800_000_000);
        let (text, _) = m.render();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("ccnode_node_state{state=\"drained\"} 1"));
        assert!(text.contains("ccnode_node_state{state=\"active\"} 0"));
        assert!(text.contains("ccnode_node_state_changed_timestamp_seconds 1800000000"));
        assert!(text.contains("ccnode_build_info{node=\"n1\",version="));
        assert!(text.contains("ccnode_admin_refused_connections_total{reason=\"unauthorized\"} 0"));
    }
}
