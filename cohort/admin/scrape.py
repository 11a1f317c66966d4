"""Scrape members' ``/metrics`` and turn two scrapes into rates (``cohort top``, dashboard).

A *sample* is a small flat summary of one member's Prometheus text: cumulative totals
(requests, errors, latency sum/count and buckets, lock operations, lease renewals, log
appends) and a few levels (partitions).  :func:`rates` divides the difference of two
samples by the time between them.  Latency quantiles come from the histogram buckets'
difference, the way Prometheus' ``histogram_quantile`` does it.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Sample = dict[str, Any]

# RPC methods that are partition-lock traffic at the coordinator (today's partition locks
# live there; the DLM's own message counters are added when the DLM exports them).
LOCK_METHODS = ("acquire_partition", "release_partition")


def metrics_targets(view: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(member id, role, url)`` for every live member of ``view`` that exposes metrics."""
    out: list[tuple[str, str, str]] = []
    coord = view.get("coordinator") or {}
    if coord.get("metrics"):
        out.append(("coordinator", "coordinator", f"http://{coord['metrics']}/metrics"))
    for m in view.get("members", []):
        if m.get("state") not in ("alive", "draining"):
            continue
        meta = m.get("meta") or {}
        if meta.get("metrics"):
            out.append((m["id"], m["role"], f"http://{meta['metrics']}/metrics"))
        elif m["role"] == "director":
            out.append((m["id"], m["role"], f"http://{m['address']}/_cohort/metrics"))
    return out


def summarize(text: str) -> Sample:
    """The sample of one Prometheus text page."""
    s: Sample = {
        "requests": 0.0,
        "errors": 0.0,
        "lat_sum": 0.0,
        "lat_count": 0.0,
        "buckets": {},
        "lock_ops": 0.0,
        "lock_msgs": 0.0,
        "heartbeats": 0.0,
        "log_appends": 0.0,
        "log_bytes": 0.0,
        "partitions": None,
        "lease_failures": 0.0,
    }
    buckets: dict[float, float] = s["buckets"]
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            name, labels, value = smp.name, smp.labels, smp.value
            if name == "cohort_s3_requests_total":
                s["requests"] += value
                if int(labels.get("status", "0")) >= 500:
                    s["errors"] += value
            elif name == "cohort_s3_request_seconds_sum" or name == "cohort_rpc_seconds_sum":
                if labels.get("method") != "status":
                    s["lat_sum"] += value
            elif name == "cohort_s3_request_seconds_count" or name == "cohort_rpc_seconds_count":
                if labels.get("method") != "status":
                    s["lat_count"] += value
            elif name in ("cohort_s3_request_seconds_bucket", "cohort_rpc_seconds_bucket"):
                if labels.get("method") != "status":
                    le = float(labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + value
            elif name == "cohort_rpc_calls_total":
                method = labels.get("method", "")
                if method in LOCK_METHODS:
                    s["lock_ops"] += value
                elif method == "heartbeat":
                    s["heartbeats"] += value
                if fam.name == "cohort_rpc_calls" and method.startswith(
                    ("obj.", "mpu.", "bucket.")
                ):
                    s["requests"] += value
            elif name == "cohort_rpc_errors_total":
                if labels.get("method", "").startswith(("obj.", "mpu.", "bucket.")) and labels.get(
                    "code"
                ) not in ("NotOwner", "Recovering", "NoSuchKey", "PreconditionFailed"):
                    s["errors"] += value
            elif name == "cohort_dlm_messages_total":
                s["lock_msgs"] += value
            elif name == "cohort_log_appends_total":
                s["log_appends"] += value
            elif name == "cohort_log_append_bytes_total":
                s["log_bytes"] += value
            elif name == "cohort_lease_renewals_total":
                s["heartbeats"] += value
            elif name == "cohort_lease_renewal_failures_total":
                s["lease_failures"] += value
            elif name == "cohort_partitions" and labels.get("status") == "serving":
                s["partitions"] = value
    return s


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """Estimate the ``q`` quantile (seconds) of observations between two bucket snapshots."""
    les = sorted(after)
    if not les:
        return None
    counts = [after[le] - before.get(le, 0.0) for le in les]
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in zip(les, counts, strict=True):
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def rates(a: Sample, b: Sample, dt: float) -> dict[str, Any]:
    """Per-second rates and interval latencies from sample ``a`` to the later ``b``."""
    dt = max(dt, 1e-6)

    def d(k: str) -> float:
        return max(0.0, float(b[k]) - float(a[k]))

    n = d("lat_count")
    p50 = quantile(0.5, a["buckets"], b["buckets"])
    p99 = quantile(0.99, a["buckets"], b["buckets"])
    return {
        "rps": round(d("requests") / dt, 2),
        "errors_ps": round(d("errors") / dt, 2),
        "mean_ms": round(1000 * d("lat_sum") / n, 3) if n else None,
        "p50_ms": None if p50 is None else round(1000 * p50, 3),
        "p99_ms": None if p99 is None else round(1000 * p99, 3),
        "lock_ops_ps": round(d("lock_ops") / dt, 2),
        "lock_msgs_ps": round(d("lock_msgs") / dt, 2),
        "heartbeats_ps": round(d("heartbeats") / dt, 2),
        "log_appends_ps": round(d("log_appends") / dt, 2),
        "log_mb_ps": round(d("log_bytes") / dt / 1e6, 3),
        "partitions": b.get("partitions"),
    }


async def scrape_all(
    session: aiohttp.ClientSession, targets: list[tuple[str, str, str]], timeout: float = 1.5
) -> dict[str, Sample]:
    """Scrape every target concurrently; members that do not answer are left out."""

    async def one(url: str) -> Sample | None:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                if r.status != 200:
                    return None
                return summarize(await r.text())
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    results = await asyncio.gather(*(one(url) for _, _, url in targets))
    out: dict[str, Sample] = {}
    for (mid, role, _), smp in zip(targets, results, strict=True):
        if smp is not None:
            smp["role"] = role
            smp["t"] = time.monotonic()
            out[mid] = smp
    return out
