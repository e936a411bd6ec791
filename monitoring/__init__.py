"""Prometheus rules and configuration, the Grafana dashboard, and `make monitor` (docs/monitoring.md)."""
