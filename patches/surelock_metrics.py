"""Patch: SureLock counters on the API server's `/metrics`, next to vLLM's.

What: the API server's OutputProcessor is wrapped so that each finished
request's SureLock accounting (`EngineCoreOutput.kv_transfer_params
["surelock"]`, computed by the engine's scheduler) is added to Prometheus
counters in the API server process:
  surelock_requests_total, surelock_steps_total, surelock_steps_fixed_total,
  surelock_rows_computed_total,
  surelock_rows_nolock_total, surelock_flops_total{part=dense|attention|lm_head},
  surelock_flops_nolock_total{part=dense|attention},
  surelock_flops_saved_total, surelock_locked_row_fraction (gauge).

Why: `/metrics` is served from the API server process, while SureLock's
counts are made in the engine core process; SchedulerStats, the one stats
object that crosses over, has no field for plugin data (its dict fields are
read by the KV-connector loggers), and stat-logger plugins never see request
outputs. The per-request accounting already crosses with the request's
output, so the API side counts it there.

Versions: vLLM 0.32.0. Retire when SchedulerStats (or stat-logger plugins)
can carry plugin-defined counters.
"""

from __future__ import annotations

_original_process_outputs = None
_metrics = None


def apply() -> None:
    global _original_process_outputs
    from vllm.v1.engine.output_processor import OutputProcessor

    if is_applied():
        return
    _original_process_outputs = OutputProcessor.process_outputs

    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        for output in engine_core_outputs:
            params = output.kv_transfer_params
            if output.finish_reason is not None and params and "surelock" in params:
                observe(params["surelock"])
        return _original_process_outputs(self, engine_core_outputs, *args, **kwargs)

    process_outputs._surelock_patch = True
    OutputProcessor.process_outputs = process_outputs


def is_applied() -> bool:
    from vllm.v1.engine.output_processor import OutputProcessor

    return getattr(OutputProcessor.process_outputs, "_surelock_patch", False)


class SureLockMetrics:
    def __init__(self):
        from prometheus_client import Counter, Gauge

        self.requests = Counter("surelock_requests_total", "Finished diffusion requests")
        self.steps = Counter("surelock_steps_total", "Diffusion steps taken")
        self.steps_fixed = Counter(
            "surelock_steps_fixed_total", "Diffusion steps the fixed schedule would take (requests' steps)"
        )
        self.rows = Counter("surelock_rows_computed_total", "Transformer rows computed")
        self.rows_nolock = Counter("surelock_rows_nolock_total", "Rows the same sampler without locking computes")
        self.flops = Counter("surelock_flops_total", "Algorithmic FLOPs computed (by formula)", ["part"])
        self.flops_nolock = Counter("surelock_flops_nolock_total", "Algorithmic FLOPs without locking", ["part"])
        self.saved = Counter("surelock_flops_saved_total", "Dense + attention FLOPs saved by locking")
        self.locked_fraction = Gauge("surelock_locked_row_fraction", "Share of rows skipped because locked, all requests so far")

    def observe(self, stats: dict) -> None:
        self.requests.inc()
        self.steps.inc(stats["steps"])
        self.steps_fixed.inc(stats["steps_fixed"])
        self.rows.inc(stats["rows"])
        self.rows_nolock.inc(stats["rows_nolock"])
        for part in ("dense", "attention"):
            self.flops.labels(part).inc(stats[f"{part}_flops"])
            self.flops_nolock.labels(part).inc(stats[f"{part}_flops_nolock"])
        self.flops.labels("lm_head").inc(stats["lm_head_flops"])
        self.saved.inc(
            stats["dense_flops_nolock"] + stats["attention_flops_nolock"]
            - stats["dense_flops"] - stats["attention_flops"]
        )
        rows, base = self.rows._value.get(), self.rows_nolock._value.get()
        self.locked_fraction.set(1.0 - rows / base if base else 0.0)


def observe(stats: dict) -> None:
    global _metrics
    if _metrics is None:
        _metrics = SureLockMetrics()
    _metrics.observe(stats)
