"""``/metrics`` in Prometheus' text format (version 0.0.4), written by hand: a handful of
gauges and counters need no client library."""

from __future__ import annotations

import torch

from cadence.serve.settings import ServeSettings


def _rss_bytes() -> int | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return None


def render(worker, settings: ServeSettings) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]):
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("cadence_queue_length", "gauge", "jobs waiting for a device slot", [("", len(worker.queue))])
    metric("cadence_queue_capacity", "gauge", "jobs the queue holds before answering 429", [("", worker.queue.capacity)])
    metric("cadence_jobs_running", "gauge", "jobs generating now", [("", len(worker.running))])
    metric("cadence_device_slots", "gauge", "generations that may run at once", [("", settings.concurrency)])
    metric("cadence_jobs_finished_total", "counter", "jobs finished, by final status",
           [(f'{{status="{status}"}}', count) for status, count in worker.finished.items()])
    metric("cadence_jobs_rejected_total", "counter", "requests answered 429 (queue full)", [("", worker.rejected)])
    total, count = worker.run_seconds
    metric("cadence_job_seconds", "summary", "wall time of a job from its start to its files written",
           [("_sum", total), ("_count", count)])  # the suffix after the name: name_sum, name_count
    waited, count = worker.wait_seconds
    metric("cadence_job_queue_seconds", "summary", "time a job waited in the queue", [("_sum", waited), ("_count", count)])
    if torch.cuda.is_available():
        devices = range(torch.cuda.device_count())
        metric("cadence_gpu_memory_allocated_bytes", "gauge", "memory allocated by tensors on each GPU",
               [(f'{{device="cuda:{i}"}}', torch.cuda.memory_allocated(i)) for i in devices])
        metric("cadence_gpu_memory_reserved_bytes", "gauge", "memory held by the caching allocator on each GPU",
               [(f'{{device="cuda:{i}"}}', torch.cuda.memory_reserved(i)) for i in devices])
    rss = _rss_bytes()
    if rss is not None:
        metric("cadence_process_resident_bytes", "gauge", "resident memory of the server process", [("", rss)])
    return "\n".join(lines) + "\n"
