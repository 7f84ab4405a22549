"""Prometheus metrics of the operator (served on --metrics-port)."""

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("spanvm_reconcile_total", "SpanningVM reconciliations, by result.", ["result"])
RECONCILE_SECONDS = Histogram(
    "spanvm_reconcile_duration_seconds", "Time one SpanningVM reconciliation took."
)
PLACEMENTS = Counter("spanvm_placements_total", "SpanningVMs placed on nodes.")
UNSCHEDULABLE = Counter(
    "spanvm_unschedulable_total", "Scheduling attempts that found no placement."
)
FRAGMENTS_CREATED = Counter("spanvm_fragments_created_total", "VMFragment objects created.")
FAILURES = Counter("spanvm_vm_failures_total", "SpanningVMs that failed, by reason.", ["reason"])
RESTARTS = Counter("spanvm_vm_restarts_total", "Guests restarted under runStrategy Always.")
LEADER = Gauge("spanvm_operator_leader", "1 while this replica holds the operator Lease.")
