"""Every process's ``/metrics`` parses with the Prometheus text parser, and the series move
under S3 load; the director's operator endpoints need a login."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cohort.admin.scrape import quantile, rates, summarize
from cohort.admin.web import check_session, sign_session
from cohort.cluster import LocalCluster
from cohort.coord.client import RpcCoordinator
from tests.conftest import s3_client, start_cluster

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("metrics"))
    yield c
    c.stop()


def view(cluster: LocalCluster) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        c = RpcCoordinator(cluster.coordinator_address, cluster.credential())
        try:
            return await c.view()
        finally:
            await c.close()

    return asyncio.run(go())


def scrape(url: str) -> Series:
    r = requests.get(url, timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    out: Series = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(series: Series, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and want <= set(ls))


def urls(cluster: LocalCluster) -> dict[str, str]:
    v = view(cluster)
    out = {"director-1": f"{cluster.s3_endpoint}/_cohort/metrics"}
    out["coordinator"] = f"http://{v['coordinator']['metrics']}/metrics"
    for m in v["members"]:
        if m["role"] == "server":
            out[m["id"]] = f"http://{m['meta']['metrics']}/metrics"
    return out


def test_series_change_under_load(cluster: LocalCluster) -> None:
    u = urls(cluster)
    servers = [k for k in u if k.startswith("server-")]
    assert len(servers) == 3
    before = {k: scrape(url) for k, url in u.items()}

    # identity and levels before any load
    for sid in servers:
        assert total(before[sid], "cohort_member_info", role="server", member=sid) == 1
    assert sum(total(before[s], "cohort_partitions_owned") for s in servers) == 64
    assert sum(total(before[s], "cohort_partitions", status="serving") for s in servers) == 64
    assert sum(total(before[s], "cohort_replay_seconds_count") for s in servers) >= 64
    c = before["coordinator"]
    assert total(c, "cohort_members", role="server", state="alive") == 3
    assert total(c, "cohort_members", role="director", state="alive") == 1
    assert total(c, "cohort_map_partitions", state="serving") == 64
    assert total(c, "cohort_map_partitions", state="unassigned") == 0

    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="metrics-load")
    n = 40
    for i in range(n):
        s3.put_object(Bucket="metrics-load", Key=f"key-{i}", Body=b"z" * 1000)
    for i in range(n):
        s3.get_object(Bucket="metrics-load", Key=f"key-{i}")["Body"].read()
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket="metrics-load", Key="missing")
    time.sleep(1.0)  # a few heartbeats
    after = {k: scrape(url) for k, url in u.items()}

    d0, d1 = before["director-1"], after["director-1"]

    def delta(name: str, who: str = "director-1", **labels: str) -> float:
        return total(after[who], name, **labels) - total(before[who], name, **labels)

    assert delta("cohort_s3_requests_total", op="PutObject", status="200") == n
    assert delta("cohort_s3_requests_total", op="GetObject", status="200") == n
    assert delta("cohort_s3_requests_total", op="GetObject", status="404") == 1
    assert delta("cohort_s3_request_seconds_count", op="PutObject", status="200") == n
    assert delta("cohort_s3_request_seconds_sum", op="PutObject") > 0
    # histogram buckets are cumulative and end in +Inf == count
    inf = total(d1, "cohort_s3_request_seconds_bucket", op="PutObject", status="200", le="+Inf")
    assert inf == total(d1, "cohort_s3_request_seconds_count", op="PutObject", status="200")
    assert d0 is not d1

    def server_delta(name: str, **labels: str) -> float:
        return sum(delta(name, s, **labels) for s in servers)

    assert server_delta("cohort_rpc_calls_total", method="obj.put") == n
    assert server_delta("cohort_rpc_calls_total", method="obj.get") == n + 1
    assert server_delta("cohort_rpc_seconds_count", method="obj.put") == n
    assert server_delta("cohort_log_appends_total") >= 1  # group commit: <= n segments
    assert server_delta("cohort_log_appends_total") <= n
    assert server_delta("cohort_log_append_bytes_total") > n * 50
    assert server_delta("cohort_log_append_seconds_count") == server_delta(
        "cohort_log_appends_total"
    )
    assert server_delta("cohort_lease_renewals_total") >= 3
    assert server_delta("cohort_objects") == n
    assert delta("cohort_rpc_calls_total", "coordinator", method="heartbeat") >= 3
    assert delta("cohort_rpc_calls_total", "coordinator", method="create_bucket") == 1


def test_plain_metrics_path_stays_s3(cluster: LocalCluster) -> None:
    """``/metrics`` on a director is the bucket "metrics", not the metrics page."""
    r = requests.get(f"{cluster.s3_endpoint}/metrics", timeout=5)
    assert r.status_code in (403, 404) and b"<Error>" in r.content  # an S3 answer
    assert b"cohort_" not in r.content
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="metrics")
    s3.put_object(Bucket="metrics", Key="a", Body=b"1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="metrics")["Contents"]]
    assert keys == ["a"]


def test_operator_endpoints_need_login(cluster: LocalCluster) -> None:
    ep = cluster.s3_endpoint
    r = requests.get(f"{ep}/_cohort/dashboard", allow_redirects=False, timeout=5)
    assert r.status_code == 303 and r.headers["Location"] == "/_cohort/login"
    for path in ("/_cohort/api/view", "/_cohort/api/events", "/_cohort/events"):
        r = requests.get(ep + path, timeout=5)
        assert r.status_code == 401 and r.json()["login"] == "/_cohort/login"
    s = requests.Session()
    bad = s.post(
        f"{ep}/_cohort/login",
        data={"access_key": cluster.creds["access_key"], "secret_key": "wrong"},
        timeout=5,
    )
    assert bad.status_code == 401 and "Wrong access key or secret" in bad.text
    ok = s.post(
        f"{ep}/_cohort/login",
        data={"access_key": cluster.creds["access_key"], "secret_key": cluster.creds["secret_key"]},
        timeout=5,
    )
    assert ok.status_code == 200 and ok.url.endswith("/_cohort/dashboard")
    assert "partition" in ok.text.lower()
    v = s.get(f"{ep}/_cohort/api/view", timeout=5).json()
    assert len(v["partitions"]) == 64 and v["director"] == "director-1"
    assert s.get(f"{ep}/_cohort/static/app.js", timeout=5).status_code == 200
    assert s.get(f"{ep}/_cohort/static/../web.py", timeout=5).status_code == 404
    # state changes need the custom header (no cross-site form posts)
    r = s.post(f"{ep}/_cohort/api/state", json={"server": "server-1", "state": "draining"})
    assert r.status_code == 403
    r = s.post(
        f"{ep}/_cohort/api/state",
        json={"server": "server-9", "state": "draining"},
        headers={"X-Cohort-Request": "1"},
    )
    assert r.status_code == 404 and "server-9" in r.json()["error"]
    # the SSE stream starts with the view, the events and the rate history
    with s.get(f"{ep}/_cohort/events", stream=True, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        kinds = []
        for line in r.iter_lines():
            if line.startswith(b"event: "):
                kinds.append(line[7:].decode())
            if len(kinds) == 3:
                break
    assert kinds == ["view", "events", "history"]


def test_session_tokens() -> None:
    secrets = {"AK": "s3cret"}
    now = time.time()
    tok = sign_session("AK", "s3cret", int(now) + 60)
    assert check_session(tok, secrets.get, now) == "AK"
    assert check_session(tok, secrets.get, now + 120) is None  # expired
    assert check_session(tok, {"AK": "rotated"}.get, now) is None  # secret changed
    assert check_session(tok[:-1] + ("0" if tok[-1] != "0" else "1"), secrets.get, now) is None
    assert check_session("garbage", secrets.get, now) is None


def test_rates_and_quantiles() -> None:
    text_a = (
        'cohort_s3_requests_total{op="GetObject",status="200"} 10\n'
        'cohort_s3_request_seconds_bucket{op="GetObject",status="200",le="0.01"} 5\n'
        'cohort_s3_request_seconds_bucket{op="GetObject",status="200",le="0.1"} 10\n'
        'cohort_s3_request_seconds_bucket{op="GetObject",status="200",le="+Inf"} 10\n'
        'cohort_s3_request_seconds_sum{op="GetObject",status="200"} 0.3\n'
        'cohort_s3_request_seconds_count{op="GetObject",status="200"} 10\n'
    )
    text_b = text_a.replace("} 10\n", "} 110\n").replace("} 5\n", "} 55\n").replace("0.3", "2.3")
    a, b = summarize(text_a), summarize(text_b)
    r = rates(a, b, 2.0)
    assert r["rps"] == 50.0 and r["mean_ms"] == 20.0
    assert r["p50_ms"] == pytest.approx(10.0)
    assert 10.0 < r["p99_ms"] <= 100.0
    assert quantile(0.5, {}, {}) is None
