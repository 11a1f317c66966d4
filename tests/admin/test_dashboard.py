"""The dashboard in headless Chromium (Debian's ``chromium`` driven by Playwright's Python
package; ``playwright install`` is never needed).

The page loads behind the login, shows the three layers with three servers and a partition
grid; when a server is killed with SIGKILL the grid shows its partitions on the survivors
within the failover window; the drain button (with its confirmation) empties a server.
Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cohort.cluster import LocalCluster
from tests.conftest import s3_client, start_cluster

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
FAILOVER_WINDOW = 10.0  # seconds: lease 2.5 s + reassignment + SSE push, with slack


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("dashboard"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} missing: bash scripts/system-deps.sh installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield b
        b.close()


def owners(page: Any) -> dict[str, int]:
    counts: dict[str, int] = page.evaluate(
        """() => { const c = {}; for (const e of document.querySelectorAll('#grid .cell'))
             { c[e.dataset.owner] = (c[e.dataset.owner] || 0) + 1; } return c; }"""
    )
    return counts


def test_dashboard_live_failover_and_drain(cluster: LocalCluster, browser: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # the dashboard needs a login
    page.goto(f"{cluster.s3_endpoint}/_cohort/dashboard")
    assert page.url.endswith("/_cohort/login")
    page.fill("#access_key", cluster.creds["access_key"])
    page.fill("#secret_key", cluster.creds["secret_key"])
    page.click("#login")
    page.wait_for_url("**/_cohort/dashboard")

    # three layers, three servers, a full grid
    page.wait_for_function("document.querySelectorAll('#servers .member').length === 3")
    ids = page.eval_on_selector_all("#servers .member", "els => els.map(e => e.dataset.id)")
    assert ids == ["server-1", "server-2", "server-3"]
    assert page.eval_on_selector_all("#directors .member", "els => els.length") == 1
    assert page.inner_text("#coordinator").startswith("coordinator")
    page.wait_for_function("document.querySelectorAll('#grid .cell').length === 64")
    before = owners(page)
    assert set(before) == {"server-1", "server-2", "server-3"} and before["server-2"] > 0
    assert page.inner_text("#verdict") == "healthy"

    # some S3 traffic for the request chart, then let the sampler catch it
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="dash")
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            try:
                s3.put_object(Bucket="dash", Key=f"k{i % 50}", Body=b"x" * 100)
            except Exception:
                time.sleep(0.1)
            i += 1

    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        page.wait_for_function(
            "document.querySelector('#legend-req').innerText.includes('director-1')",
            timeout=15000,
        )
        page.screenshot(path=str(ARTIFACTS / "dashboard-1-healthy.png"), full_page=True)

        # kill -9 one server: the grid must move its partitions to the survivors
        t0 = time.monotonic()
        cluster.kill("server-2")
        page.wait_for_function(
            """() => { const cells = [...document.querySelectorAll('#grid .cell')];
                 return cells.length === 64 && cells.every(c => c.dataset.owner
                   && c.dataset.owner !== 'server-2'); }""",
            timeout=FAILOVER_WINDOW * 1000,
        )
        moved_after = time.monotonic() - t0
        page.wait_for_timeout(600)  # let the colour transition finish for the picture
        page.screenshot(path=str(ARTIFACTS / "dashboard-2-after-kill.png"), full_page=True)
        after = owners(page)
        assert set(after) == {"server-1", "server-3"}
        assert moved_after < FAILOVER_WINDOW
        page.wait_for_selector('#servers .member[data-id="server-2"][data-state="dead"]')
        page.wait_for_function(
            "[...document.querySelectorAll('#events li')].some(li => li.dataset.kind === 'member-dead')"
        )
    finally:
        stop.set()
        t.join(10)

    # drain server-3 from its card, through the confirmation dialog
    page.click('#servers .member[data-id="server-3"] button.drain')
    page.wait_for_selector("#confirm[open]")
    assert "Drain server-3" in page.inner_text("#confirm-text")
    page.click("#confirm-ok")
    page.wait_for_function(
        """() => [...document.querySelectorAll('#grid .cell')]
                 .every(c => c.dataset.owner === 'server-1')""",
        timeout=15000,
    )
    page.wait_for_selector('#servers .member[data-id="server-3"][data-state="draining"]')
    page.screenshot(path=str(ARTIFACTS / "dashboard-3-drained.png"), full_page=True)
    assert not errors, errors
    print(f"grid showed the failover {moved_after:.2f} s after kill -9")
