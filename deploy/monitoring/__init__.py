"""Prometheus rules and Grafana dashboards of eddy (over the metric catalogue in streams/catalogue.py)."""
