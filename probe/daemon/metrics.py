"""Prometheus metrics, named as blackbox_exporter names them, on a registry of our own."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from probe.model import PHASES, Measurement

LABELS = "target group path kind"
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # every histogram's, in seconds

# Every metric: the attribute of Metrics, its type, its name (a counter's is exposed with
# `_total`), its help and its labels. The first three are the last probe of each target
# through each path, as blackbox_exporter has them; then rounds and the event loop
# (probe/daemon/probing.py, watchdog.py), the store writer (writer.py), fleet mode
# (forwarding.py) and alerts (notifier.py).
METRICS: dict[str, tuple[type[Counter | Gauge | Histogram], str, str, str]] = {
    "success": (Gauge, "probe_success", "Whether the last probe succeeded", LABELS),
    "duration": (Gauge, "probe_duration_seconds", "How long the last probe took", LABELS),
    "phase": (Gauge, "probe_phase_duration_seconds", "Duration of each phase of the last probe", f"{LABELS} phase"),
    "rounds": (Counter, "tunnelwatch_rounds", "Rounds run (one target through all its paths)", "group"),
    "skipped": (Counter, "tunnelwatch_rounds_skipped", "Rounds not run: the previous one still running (overrun) or the start too late (missed)", "group reason"),
    "round_duration": (Histogram, "tunnelwatch_round_duration_seconds", "Duration of a round", "group"),
    "schedule_lag": (Histogram, "tunnelwatch_schedule_lag_seconds", "How late rounds started", ""),
    "loop_lag": (Gauge, "tunnelwatch_event_loop_lag_seconds", "Event loop lag at the last check", ""),
    "store_write": (Histogram, "tunnelwatch_store_write_seconds", "Duration of a store write", ""),
    "store_buffered": (Gauge, "tunnelwatch_store_buffered_measurements", "Measurements waiting to be written", ""),
    "store_errors": (Counter, "tunnelwatch_store_write_errors", "Failed store writes", ""),
    "store_dropped": (Counter, "tunnelwatch_store_dropped_measurements", "Measurements dropped because the buffer was full", ""),
    "store_reopened": (Counter, "tunnelwatch_store_reopened", "Times the store file was found deleted, replaced or damaged, and the daemon went on in a store at store.path (a fresh one; a damaged file moved aside)", "reason"),
    "forwarded": (Counter, "tunnelwatch_forwarded_measurements", "Measurements uploaded to the central store", ""),
    "forward_errors": (Counter, "tunnelwatch_forward_errors", "Failed uploads to the central store", ""),
    "forward_backlog": (Gauge, "tunnelwatch_forward_backlog_measurements", "Measurements in the spool not uploaded yet", ""),
    "forward_backlog_age": (Gauge, "tunnelwatch_forward_backlog_age_seconds", "Age of the oldest measurement not uploaded yet", ""),
    "forward_dropped": (Gauge, "tunnelwatch_forward_dropped_measurements", "Measurements never uploaded: the backlog outgrew store.spool_max_rows", ""),
    "notifications_sent": (Counter, "tunnelwatch_notifications_sent", "Alert messages sent, one per destination", ""),
    "notifications_failed": (Counter, "tunnelwatch_notifications_failed", "Failed attempts to send an alert message (each is retried)", ""),
    "notifications_dropped": (Counter, "tunnelwatch_notifications_dropped", "Unsent alert messages dropped: their destination is no longer in alerts.urls", ""),
    "notifications_pending": (Gauge, "tunnelwatch_notifications_pending", "Alert messages not sent yet", ""),
    "alerts_open": (Gauge, "tunnelwatch_alerts_open", "Alerts open now (outages not over)", ""),
}  # fmt: skip


class Metrics:
    """The metrics of METRICS, on a registry of our own."""

    success: Gauge
    duration: Gauge
    phase: Gauge
    rounds: Counter
    skipped: Counter
    round_duration: Histogram
    schedule_lag: Histogram
    loop_lag: Gauge
    store_write: Histogram
    store_buffered: Gauge
    store_errors: Counter
    store_dropped: Counter
    store_reopened: Counter
    forwarded: Counter
    forward_errors: Counter
    forward_backlog: Gauge
    forward_backlog_age: Gauge
    forward_dropped: Gauge
    notifications_sent: Counter
    notifications_failed: Counter
    notifications_dropped: Counter
    notifications_pending: Gauge
    alerts_open: Gauge

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for attribute, (kind, name, documentation, labels) in METRICS.items():
            metric: Counter | Gauge | Histogram
            if kind is Histogram:
                metric = Histogram(name, documentation, labels.split(), registry=self.registry, buckets=LAG_BUCKETS)
            else:
                metric = kind(name, documentation, labels.split(), registry=self.registry)
            setattr(self, attribute, metric)
        for reason in ("deleted", "replaced", "damaged"):
            self.store_reopened.labels(reason)  # at 0 from the start, for rate() and alerts

    def observe(self, m: Measurement) -> None:
        labels = (m.target, m.group, m.path, m.kind)
        self.success.labels(*labels).set(int(m.ok))
        self.duration.labels(*labels).set((m.total_ms or 0) / 1000)
        for phase in PHASES:
            value = getattr(m, f"{phase}_ms")
            if value is not None:
                self.phase.labels(*labels, phase).set(value / 1000)
            else:
                try:
                    self.phase.remove(*labels, phase)
                except KeyError:
                    pass

    def forget_probes(self) -> None:
        """Drop per-probe series, so targets and paths removed by a reload disappear."""
        for gauge in (self.success, self.duration, self.phase):
            gauge.clear()

    def serve(self, host: str, port: int) -> WSGIServer:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server
