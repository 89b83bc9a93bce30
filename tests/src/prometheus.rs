//! A real Prometheus server and promtool for tests (filled in by the Prometheus e2e work).
