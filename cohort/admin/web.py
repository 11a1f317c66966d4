"""Operator endpoints of a director, under ``/_cohort/`` (bucket names cannot start with ``_``).

============================  =========  ===================================================
path                          auth       what
============================  =========  ===================================================
``/_cohort/metrics``          none       this director's Prometheus metrics
``/_cohort/login``            -          GET: form; POST ``access_key``, ``secret_key``
``/_cohort/logout``           -          drops the session cookie
``/_cohort/dashboard``        session    the dashboard (static HTML + JS from the package)
``/_cohort/static/NAME``      none       the dashboard's JS/CSS
``/_cohort/api/view``         session    the coordinator view (JSON)
``/_cohort/api/events``       session    the coordinator's event list (JSON)
``/_cohort/api/stats``        session    request / lock rates history (JSON)
``/_cohort/api/state``        session    POST ``{"server", "state": draining|alive}``
``/_cohort/events``           session    server-sent events: ``view``, ``events``, ``stats``
============================  =========  ===================================================

Login: the S3 access key and secret (checked against the director's credentials) give a
session cookie ``cohort_session = key.expiry.HMAC-SHA256(secret, key|expiry)``; it is
``HttpOnly`` and ``SameSite=Strict``, valid on every director that has the same
credentials, and becomes invalid when the secret changes.  State-changing calls also need
the header ``X-Cohort-Request: 1`` (a page on another origin cannot send it).

Login attempts are throttled (:class:`LoginThrottle`): after 5 failures from one client
address, that address must wait 1 s, then 2, 4 ... up to 5 minutes after each further
failure, and all addresses together may fail at most 30 times in a burst and 1 time a
second after that.  A throttled attempt is answered ``429`` with ``Retry-After`` and its
credentials are not even looked at, so it tells a guesser nothing.  The secret is
compared in constant time (digests of equal length), also when the key is unknown.

Live data: one task follows the router's cached view (the director already watches the
coordinator) and pushes each new version (at most every 100 ms) and new coordinator
events to every SSE subscriber.  While at least one dashboard is connected, a sampler
scrapes every member's metrics every 2 s and pushes request and lock rates; it keeps the
last 10 minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web

from cohort.admin.scrape import Sample, metrics_targets, rates, scrape_all, summarize
from cohort.metrics import DirectorMetrics
from cohort.rpc import RpcError

log = logging.getLogger("cohort.admin.web")

COOKIE = "cohort_session"
SESSION_SECONDS = 12 * 3600
SAMPLE_EVERY = 2.0
HISTORY = 300  # samples: 10 minutes at 2 s
IDLE_STOP = 120.0  # stop sampling this long after the last dashboard left
STATIC = {
    "app.js": "application/javascript",
    "style.css": "text/css",
    "dashboard.html": "text/html",
    "login.html": "text/html",
}


class LoginThrottle:
    """Failed dashboard logins, per client address and overall (one per director).

    ``retry_after(addr)`` is 0 when an attempt from ``addr`` may be checked now, else
    the seconds to wait.  Per address: the first ``free`` failures cost nothing; after
    that each failure locks the address for ``base * 2**(n - free)`` seconds (at most
    ``cap``).  An address's record is forgotten ``forget`` seconds after its last
    failure, or at once on a successful login.  Overall: a token bucket of ``burst``
    failures refilled at ``rate`` per second, so that guessing from many addresses is
    bounded too; while it is empty every login waits, including correct ones (the S3
    API does not depend on the dashboard)."""

    def __init__(
        self,
        *,
        free: int = 5,
        base: float = 1.0,
        cap: float = 300.0,
        forget: float = 900.0,
        burst: float = 30.0,
        rate: float = 1.0,
        max_tracked: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free, self.base, self.cap, self.forget = free, base, cap, forget
        self.burst, self.rate, self.max_tracked = burst, rate, max_tracked
        self.clock = clock
        self.failures: dict[str, tuple[int, float]] = {}  # addr -> (count, last failure)
        self.tokens = burst
        self._refilled = clock()

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self._refilled) * self.rate)
        self._refilled = now

    def lock_time(self, failures: int) -> float:
        if failures < self.free:
            return 0.0
        return float(min(self.cap, self.base * 2 ** (failures - self.free)))

    def retry_after(self, addr: str) -> float:
        now = self.clock()
        self._refill(now)
        wait = 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate
        rec = self.failures.get(addr)
        if rec is not None:
            n, last = rec
            if now - last > self.forget:
                del self.failures[addr]
            else:
                wait = max(wait, last + self.lock_time(n) - now)
        return max(0.0, wait)

    def failed(self, addr: str) -> None:
        now = self.clock()
        self._refill(now)
        self.tokens = max(0.0, self.tokens - 1)
        n = self.failures.pop(addr, (0, now))[0]
        if len(self.failures) >= self.max_tracked:
            # bounded memory: forget stale records, else the oldest half
            stale = [a for a, (_, t) in self.failures.items() if now - t > self.forget]
            for a in stale or list(self.failures)[: self.max_tracked // 2]:
                del self.failures[a]
        self.failures[addr] = (n + 1, now)  # re-inserted: dict order is oldest first

    def succeeded(self, addr: str) -> None:
        self.failures.pop(addr, None)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


_NO_SECRET = _digest("cohort: no such access key")


def _asset(name: str) -> bytes:
    return (resources.files("cohort.admin") / "dashboard" / name).read_bytes()


def sign_session(access_key: str, secret: str, expiry: int) -> str:
    mac = hmac.new(
        secret.encode(), f"cohort-session|{access_key}|{expiry}".encode(), hashlib.sha256
    ).hexdigest()
    return f"{access_key}.{expiry}.{mac}"


def check_session(token: str, secret_for: Callable[[str], str | None], now: float) -> str | None:
    """The access key of a valid session token, else None."""
    try:
        key, exp, mac = token.split(".", 2)
        expiry = int(exp)
    except ValueError:
        return None
    secret = secret_for(key)
    if secret is None or expiry < now:
        return None
    good = sign_session(key, secret, expiry).rsplit(".", 1)[1]
    return key if hmac.compare_digest(good, mac) else None


class AdminApp:
    def __init__(
        self,
        router: Any,
        metrics: DirectorMetrics,
        secret_for: Callable[[str], str | None],
        member_id: str,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.secret_for = secret_for
        self.member_id = member_id
        self.subscribers: set[asyncio.Queue[tuple[str, Any]]] = set()
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._prev: dict[str, Sample] = {}
        self._last_seen_dashboard = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._events_seen = 0.0
        self.throttle = LoginThrottle()
        self.routes: dict[tuple[str, str], Callable[[web.Request], Any]] = {
            ("GET", "/_cohort/metrics"): self.metrics.handle,
            ("GET", "/_cohort/login"): self.login_form,
            ("POST", "/_cohort/login"): self.login,
            ("GET", "/_cohort/logout"): self.logout,
            ("GET", "/_cohort/dashboard"): self.dashboard,
            ("GET", "/_cohort/"): self.dashboard,
            ("GET", "/_cohort/api/view"): self.api_view,
            ("GET", "/_cohort/api/events"): self.api_events,
            ("GET", "/_cohort/api/stats"): self.api_stats,
            ("POST", "/_cohort/api/state"): self.api_state,
            ("GET", "/_cohort/events"): self.sse,
        }

    # -- lifecycle ------------------------------------------------------------------------------
    async def close(self) -> None:
        self._publish("bye", None)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks = []
        if self._session is not None:
            await self._session.close()

    def _ensure_tasks(self) -> None:
        self._last_seen_dashboard = time.monotonic()
        self._tasks = [t for t in self._tasks if not t.done()]
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._follow_view()),
                asyncio.create_task(self._sample_loop()),
            ]

    # -- dispatch -------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        method = "GET" if request.method == "HEAD" else request.method
        if request.path.startswith("/_cohort/static/") and method == "GET":
            return self.static(request.path.rsplit("/", 1)[1])
        h = self.routes.get((method, request.path))
        if h is None:
            if any(p == request.path for _, p in self.routes):
                return web.json_response({"error": "method not allowed"}, status=405)
            return web.json_response({"error": f"no such page {request.path}"}, status=404)
        resp: web.StreamResponse = await h(request)
        return resp

    def static(self, name: str) -> web.Response:
        ctype = STATIC.get(name)
        if ctype is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.Response(
            body=_asset(name), content_type=ctype, headers={"Cache-Control": "no-cache"}
        )

    def _user(self, request: web.Request) -> str | None:
        token = request.cookies.get(COOKIE)
        return None if not token else check_session(token, self.secret_for, time.time())

    def _require(self, request: web.Request) -> None:
        if self._user(request) is None:
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": "login required", "login": "/_cohort/login"}),
                content_type="application/json",
            )

    # -- login ----------------------------------------------------------------------------------
    async def login_form(self, request: web.Request) -> web.Response:
        return web.Response(body=_asset("login.html"), content_type="text/html")

    @staticmethod
    def _login_page(
        message: str, status: int, headers: dict[str, str] | None = None
    ) -> web.Response:
        html = _asset("login.html").replace(
            b"<!--error-->", f'<p class="error">{message}</p>'.encode()
        )
        return web.Response(body=html, content_type="text/html", status=status, headers=headers)

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        addr = request.remote or "unknown"
        # no await from here to the verdict: concurrent guesses cannot all slip past
        wait = self.throttle.retry_after(addr)
        if wait > 0:
            secs = max(1, math.ceil(wait))
            log.warning("dashboard login from %s throttled for %d s", addr, secs)
            return self._login_page(
                f"Too many failed sign-ins. Try again in {secs} s.",
                429,
                {"Retry-After": str(secs)},
            )
        key = str(form.get("access_key", "")).strip()
        secret = str(form.get("secret_key", ""))
        expected = self.secret_for(key) if key else None
        # equal-length digests, and the same work for an unknown key
        good = hmac.compare_digest(
            _NO_SECRET if expected is None else _digest(expected), _digest(secret)
        )
        if expected is None or not good:
            self.throttle.failed(addr)
            log.info("dashboard login failed from %s", addr)
            return self._login_page("Wrong access key or secret.", 401)
        self.throttle.succeeded(addr)
        expiry = int(time.time()) + SESSION_SECONDS
        resp = web.HTTPSeeOther("/_cohort/dashboard")
        resp.set_cookie(
            COOKIE,
            sign_session(key, expected, expiry),
            max_age=SESSION_SECONDS,
            path="/_cohort/",
            httponly=True,
            samesite="Strict",
        )
        raise resp

    async def logout(self, request: web.Request) -> web.Response:
        resp = web.HTTPSeeOther("/_cohort/login")
        resp.del_cookie(COOKIE, path="/_cohort/")
        raise resp

    # -- pages and API --------------------------------------------------------------------------
    async def dashboard(self, request: web.Request) -> web.Response:
        if self._user(request) is None:
            raise web.HTTPSeeOther("/_cohort/login")
        self._ensure_tasks()
        return web.Response(
            body=_asset("dashboard.html"),
            content_type="text/html",
            headers={"Cache-Control": "no-cache"},
        )

    async def api_view(self, request: web.Request) -> web.Response:
        self._require(request)
        return web.json_response(self._view_doc())

    async def api_events(self, request: web.Request) -> web.Response:
        self._require(request)
        return web.json_response(await self._events())

    async def api_stats(self, request: web.Request) -> web.Response:
        self._require(request)
        self._ensure_tasks()
        return web.json_response(list(self.history))

    async def api_state(self, request: web.Request) -> web.Response:
        self._require(request)
        if request.headers.get("X-Cohort-Request") != "1":
            return web.json_response({"error": "missing X-Cohort-Request header"}, status=403)
        try:
            body = await request.json()
            server, state = str(body["server"]), str(body["state"])
        except (ValueError, KeyError, TypeError):
            return web.json_response(
                {"error": 'expected JSON {"server": ID, "state": "draining"|"alive"}'}, status=400
            )
        try:
            m = await self.router.coord.set_state(server, state)
        except RpcError as e:
            status = 404 if e.code == "UnknownMember" else 409 if e.code == "MemberDown" else 400
            return web.json_response({"error": e.message or e.code, "code": e.code}, status=status)
        await self.router.refresh()
        log.info("operator set %s to %s via the dashboard", server, state)
        return web.json_response({"id": m["id"], "state": m["state"]})

    def _view_doc(self) -> dict[str, Any]:
        v: dict[str, Any] = self.router.view
        return {**v, "director": self.member_id, "now": time.time()}

    async def _events(self) -> list[dict[str, Any]]:
        try:
            evs: list[dict[str, Any]] = await self.router.coord.events()
        except RpcError:
            return []
        return evs[-200:]

    # -- server-sent events ---------------------------------------------------------------------
    async def sse(self, request: web.Request) -> web.StreamResponse:
        self._require(request)
        self._ensure_tasks()
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=200)
        self.subscribers.add(q)
        try:
            await self._send(resp, "view", self._view_doc())
            evs = await self._events()
            await self._send(resp, "events", evs)
            await self._send(resp, "history", list(self.history))
            while True:
                try:
                    kind, data = await asyncio.wait_for(q.get(), 15.0)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if kind == "bye":
                    break
                await self._send(resp, kind, data)
                self._last_seen_dashboard = time.monotonic()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.subscribers.discard(q)
        return resp

    @staticmethod
    async def _send(resp: web.StreamResponse, kind: str, data: Any) -> None:
        payload = json.dumps(data, separators=(",", ":"))
        await resp.write(f"event: {kind}\ndata: {payload}\n\n".encode())

    def _publish(self, kind: str, data: Any) -> None:
        for q in list(self.subscribers):
            if q.full():  # a stuck client: drop its oldest message rather than block
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait((kind, data))

    async def _follow_view(self) -> None:
        """Push every new view version (throttled) and new coordinator events."""
        sent = -1
        last_events = 0.0
        while True:
            ev = self.router._refreshed
            if self.router.view["version"] == sent or not self.subscribers:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), 5.0)
            if self.router.view["version"] != sent and self.subscribers:
                sent = self.router.view["version"]
                self._publish("view", self._view_doc())
                if time.monotonic() - last_events > 0.5:
                    last_events = time.monotonic()
                    evs = await self._events()
                    new = [e for e in evs if e["time"] > self._events_seen]
                    if evs:
                        self._events_seen = max(self._events_seen, evs[-1]["time"])
                    if new:
                        self._publish("events_new", new)
            await asyncio.sleep(0.1)
            if not self.subscribers:
                sent = -1

    async def _sample_loop(self) -> None:
        """While dashboards are watching: scrape every member, push rates."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        while time.monotonic() - self._last_seen_dashboard < IDLE_STOP or self.subscribers:
            t0 = time.monotonic()
            try:
                await self.sample_once()
            except Exception:
                log.exception("dashboard sampling failed")
            await asyncio.sleep(max(0.1, SAMPLE_EVERY - (time.monotonic() - t0)))

    async def sample_once(self) -> dict[str, Any] | None:
        assert self._session is not None
        view = self.router.view
        targets = [t for t in metrics_targets(view) if t[0] != self.member_id]
        samples = await scrape_all(self._session, targets)
        own = summarize(self.metrics.render().decode())
        own["role"], own["t"] = "director", time.monotonic()
        samples[self.member_id] = own
        point: dict[str, Any] | None = None
        if self._prev:
            members: dict[str, Any] = {}
            for mid, s in samples.items():
                p = self._prev.get(mid)
                if p is not None:
                    members[mid] = {"role": s["role"], **rates(p, s, s["t"] - p["t"])}
            point = {
                "t": time.time(),
                "members": members,
                "s3_rps": round(
                    sum(m["rps"] for m in members.values() if m["role"] == "director"), 2
                ),
                "lock_ops_ps": round(
                    sum(m["lock_ops_ps"] + m["lock_msgs_ps"] for m in members.values()), 2
                ),
                "heartbeats_ps": round(
                    sum(m["heartbeats_ps"] for m in members.values() if m["role"] == "coordinator"),
                    2,
                ),
            }
            self.history.append(point)
            self._publish("stats", point)
        self._prev = samples
        return point
