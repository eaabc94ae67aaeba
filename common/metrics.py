"""Every Prometheus metric Camelot exports, defined once so dashboards and services agree.

Each process calls `start(port)` from `main()`; collectors live in the default registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0,
    5.0,
)  # fmt: skip

REQUESTS = Counter(
    "camelot_requests_total",
    "Requests finished, by service, pipeline, stage and gRPC status code name.",
    ["service", "pipeline", "stage", "code"],
)
LATENCY = Histogram(
    "camelot_request_latency_seconds",
    "Request latency: end to end at the gateway, replica total at a stage.",
    ["service", "pipeline", "stage"],
    buckets=LATENCY_BUCKETS_S,
)
SM_SHARE = Gauge(
    "camelot_sm_share_percent",
    "SM share of a replica in percent of one GPU.",
    ["pipeline", "stage", "replica"],
)
REPLICAS = Gauge("camelot_replicas", "Replicas per stage in the plan.", ["pipeline", "stage"])
QOS_TARGET = Gauge("camelot_qos_p99_seconds", "p99 latency target per pipeline.", ["pipeline"])
WINDOW_P99 = Gauge(
    "camelot_window_p99_seconds",
    "Windowed p99 latency the scheduler measured (stage empty for the pipeline).",
    ["pipeline", "stage"],
)
ARRIVAL_QPS = Gauge("camelot_arrival_qps", "Windowed arrival rate per pipeline.", ["pipeline"])
PLAN_EPOCH = Gauge("camelot_plan_epoch", "Epoch of the plan in force.")
PLANNED_QPS = Gauge(
    "camelot_planned_qps", "Load per pipeline the plan in force was sized for.", ["pipeline"]
)
LOOP_DECISIONS = Counter(
    "camelot_loop_decisions_total",
    "Control-loop decisions per pipeline: trigger (a reason evaluated), replanned (a new plan "
    "changed it), resized (same placement, new planned load), kept, failed (no plan met the "
    "QoS: clamped, or an error).",
    ["pipeline", "decision"],
)
LOOP_LAST_DECISION = Gauge(
    "camelot_loop_last_decision_timestamp_seconds",
    "Unix time of the last control-loop decision of each kind per pipeline.",
    ["pipeline", "decision"],
)
BROKER_USED_BYTES = Gauge(
    "camelot_broker_used_bytes", "Bytes lent out of broker slabs.", ["pool", "device"]
)
BROKER_SLAB_BYTES = Gauge("camelot_broker_slab_bytes", "Bytes of broker slabs.", ["pool", "device"])
BROKER_LIVE_LEASES = Gauge("camelot_broker_live_leases", "Leases open in the broker.")
REPORTS_DROPPED = Counter(
    "camelot_reports_dropped_total", "Latency reports dropped (Redis down or buffer full).",
    ["service"],
)  # fmt: skip
QUEUE_DEPTH = Gauge(
    "camelot_queue_depth",
    "Requests waiting in a replica's batcher.",
    ["pipeline", "stage", "replica"],
)
GPU_XIDS = Counter(
    "camelot_gpu_xid_total", "Critical Xid events NVML reported, per GPU and Xid.", ["gpu", "xid"]
)
GPU_FAULTS = Counter(
    "camelot_gpu_fault_rounds_total",
    "Recoveries of a GPU from a fatal fault (each restarts what the fault took down).",
    ["gpu", "cause"],
)


def start(port: int) -> None:
    """Serves /metrics on port (0 disables)."""
    if port > 0:
        start_http_server(port)
