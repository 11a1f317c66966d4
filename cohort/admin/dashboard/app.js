// Cohort dashboard: plain JS, no build step, no external assets.
// Data arrives as server-sent events from /_cohort/events: "view" (the coordinator view,
// on every change), "events"/"events_new" (the coordinator's event list), "history" and
// "stats" (request and lock rates sampled by this director every 2 s).
"use strict";

const PALETTE = ["#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2",
  "#dc2626", "#65a30d", "#c026d3", "#0d9488", "#ea580c", "#4f46e5"];
const state = { view: null, events: [], history: [], colors: {}, lastOwners: null };

const $ = (sel) => document.querySelector(sel);
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
function fmtTime(t) { return new Date(t * 1000).toLocaleTimeString(); }
function toast(msg) {
  const t = $("#toast"); t.textContent = msg; t.style.display = "block";
  clearTimeout(toast.timer); toast.timer = setTimeout(() => { t.style.display = "none"; }, 4000);
}

function colorOf(id) {
  if (id == null) return "#9ca3af";
  if (!(id in state.colors)) {
    const used = Object.keys(state.colors).length;
    state.colors[id] = PALETTE[used % PALETTE.length];
  }
  return state.colors[id];
}

function latest() { return state.history.length ? state.history[state.history.length - 1] : null; }

// ------------------------------------------------------------------ layers
function memberCard(m, counts) {
  const stats = (latest() || { members: {} }).members[m.id];
  const card = el("div", { class: `member ${m.state}`, dataset: { id: m.id, state: m.state, role: m.role } });
  const title = el("div", { class: "id" });
  if (m.role === "server") title.append(el("span", { class: "swatch", style: `background:${colorOf(m.id)}` }));
  title.append(m.id);
  card.append(title, el("div", { class: "state" }, m.state), el("div", { class: "dim" }, m.address));
  if (m.role === "server") {
    const n = counts[m.id] || 0;
    card.append(el("div", { class: "parts" }, `${n} partitions`));
  }
  if (stats) {
    const lat = stats.p99_ms != null ? ` · p99 ${stats.p99_ms.toFixed(1)} ms` : "";
    card.append(el("div", { class: "dim load" }, `${stats.rps.toFixed(1)} req/s${lat}`));
  }
  if (m.role === "server" && (m.state === "alive" || m.state === "draining")) {
    const draining = m.state === "draining";
    card.append(el("button", {
      class: draining ? "undrain" : "drain",
      onclick: () => confirmState(m.id, draining ? "alive" : "draining"),
    }, draining ? "undrain" : "drain"));
  }
  return card;
}

function renderLayers() {
  const v = state.view; if (!v) return;
  const counts = {};
  for (const [owner] of v.partitions) if (owner != null) counts[owner] = (counts[owner] || 0) + 1;
  const byRole = (r) => v.members.filter((m) => m.role === r).sort((a, b) => a.id.localeCompare(b.id));
  // colours follow sorted server ids so they are stable across reloads
  for (const m of byRole("server")) colorOf(m.id);
  $("#directors").replaceChildren(...byRole("director").map((m) => memberCard(m, counts)));
  $("#servers").replaceChildren(...byRole("server").map((m) => memberCard(m, counts)));
  const st = latest();
  const coordStats = st && st.members.coordinator;
  $("#coordinator").replaceChildren(
    el("div", { class: "id" }, "coordinator"),
    el("div", { class: "state" }, "view v" + v.version),
    el("div", { class: "dim" }, `lease ${v.lease_ttl}s · ${v.partitions.length} partitions · ${v.buckets.length} buckets`),
    el("div", { class: "dim" }, coordStats
      ? `${coordStats.lock_ops_ps.toFixed(1)} lock ops/s · ${coordStats.heartbeats_ps.toFixed(1)} renewals/s`
      : "rates: sampling…"),
  );
  // verdict
  const servers = byRole("server");
  const alive = servers.filter((m) => m.state === "alive" || m.state === "draining");
  const unassigned = v.partitions.filter((p) => p[0] == null).length;
  const moving = v.partitions.filter((p) => p[0] != null && p[0] !== p[2]).length;
  const dead = servers.filter((m) => m.state === "dead").length;
  let verdict = "healthy";
  if (!alive.length || unassigned) verdict = "down";
  else if (moving || dead) verdict = "degraded";
  const pill = $("#verdict");
  pill.textContent = verdict; pill.className = "pill " + verdict;
  $("#summary").textContent = `${alive.length}/${servers.length} servers · ${byRole("director").length} directors · `
    + `${moving} moving · ${unassigned} unassigned · via ${v.director}`;
}

// ------------------------------------------------------------------ partition grid
function renderGrid() {
  const v = state.view; if (!v) return;
  const grid = $("#grid");
  if (grid.children.length !== v.partitions.length) {
    grid.replaceChildren(...v.partitions.map((_, i) => el("div", { class: "cell", dataset: { p: i } }, i)));
  }
  const prev = state.lastOwners;
  v.partitions.forEach(([owner, epoch, holder], i) => {
    const c = grid.children[i];
    c.dataset.owner = owner == null ? "" : owner;
    c.dataset.epoch = epoch;
    c.dataset.holder = holder == null ? "" : holder;
    c.style.backgroundColor = colorOf(owner);
    c.classList.toggle("moving", owner != null && owner !== holder);
    c.classList.toggle("unassigned", owner == null);
    c.title = `partition ${i}\nowner ${owner ?? "none"} (epoch ${epoch})\nlock held by ${holder ?? "nobody"}`;
    if (prev && prev[i] !== owner) {
      c.classList.add("flash");
      setTimeout(() => c.classList.remove("flash"), 1500);
    }
  });
  state.lastOwners = v.partitions.map((p) => p[0]);
  const owners = [...new Set(v.partitions.map((p) => p[0]))].sort();
  $("#legend").replaceChildren(...owners.map((o) => el("span", {},
    el("span", { class: "swatch", style: `display:inline-block;width:10px;height:10px;background:${colorOf(o)}` }),
    " " + (o ?? "unassigned"))),
  el("span", { class: "dim" }, "striped = owner is taking the lock (recovering / hand-over)"));
  $("#grid-note").textContent = `(${v.partitions.length}, coloured by owner; hover for epoch)`;
}

// ------------------------------------------------------------------ charts
function drawChart(canvas, legendEl, series) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 560, h = canvas.clientHeight || 170;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const pad = { l: 42, r: 8, t: 8, b: 20 };
  const now = Date.now() / 1000, span = 600;
  let max = 1;
  for (const s of series) for (const [, y] of s.points) max = Math.max(max, y);
  max = niceMax(max);
  const x = (t) => pad.l + (w - pad.l - pad.r) * (1 - (now - t) / span);
  const y = (v) => h - pad.b - (h - pad.t - pad.b) * (v / max);
  g.strokeStyle = "#e5e7eb"; g.fillStyle = "#6b7280"; g.font = "10px system-ui"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4, yy = y(v);
    g.beginPath(); g.moveTo(pad.l, yy); g.lineTo(w - pad.r, yy); g.stroke();
    g.fillText(v >= 100 ? v.toFixed(0) : v.toFixed(1), 4, yy + 3);
  }
  for (let m = 0; m <= 10; m += 2) {
    const xx = x(now - m * 60);
    g.fillText(m === 0 ? "now" : `-${m}m`, xx - 10, h - 6);
  }
  for (const s of series) {
    g.strokeStyle = s.color; g.lineWidth = 1.8; g.beginPath();
    let first = true;
    for (const [t, v] of s.points) {
      if (now - t > span) continue;
      if (first) { g.moveTo(x(t), y(v)); first = false; } else g.lineTo(x(t), y(v));
    }
    g.stroke();
  }
  legendEl.replaceChildren(...series.map((s) => {
    const last = s.points.length ? s.points[s.points.length - 1][1] : 0;
    return el("span", {}, el("span", { class: "swatch", style: `display:inline-block;width:10px;height:3px;background:${s.color}` }),
      ` ${s.name}: ${last.toFixed(1)}`);
  }));
}
function niceMax(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function renderCharts() {
  const hist = state.history;
  const directors = new Set(), req = {};
  for (const pt of hist) for (const [id, m] of Object.entries(pt.members)) if (m.role === "director") directors.add(id);
  const dcolors = ["#2563eb", "#059669", "#d97706", "#7c3aed"];
  const reqSeries = [...directors].sort().map((id, i) => ({
    name: id, color: dcolors[i % dcolors.length],
    points: hist.filter((pt) => pt.members[id]).map((pt) => [pt.t, pt.members[id].rps]),
  }));
  if (!reqSeries.length) reqSeries.push({ name: "requests", color: "#2563eb", points: [] });
  drawChart($("#chart-req"), $("#legend-req"), reqSeries);
  const lockSeries = [
    { name: "partition lock ops", color: "#db2777", points: hist.map((pt) => [pt.t, pt.lock_ops_ps]) },
    { name: "lease renewals", color: "#6b7280", points: hist.map((pt) => [pt.t, pt.heartbeats_ps]) },
  ];
  drawChart($("#chart-lock"), $("#legend-lock"), lockSeries);
  void req;
}

// ------------------------------------------------------------------ events
function renderEvents() {
  const list = state.events.slice(-200).reverse();
  $("#events").replaceChildren(...list.map((e) => el("li", { dataset: { kind: e.kind } },
    el("span", { class: "t" }, fmtTime(e.time)), el("span", { class: "k " + e.kind }, e.kind), e.detail)));
}

// ------------------------------------------------------------------ drain / undrain
function confirmState(server, target) {
  const dlg = $("#confirm");
  $("#confirm-text").textContent = target === "draining"
    ? `Drain ${server}? Its partitions move to the other servers (checkpoint + lock hand-over, no data copied). It stays a member and can be undrained.`
    : `Undrain ${server}? It becomes eligible for partitions again and the map rebalances.`;
  dlg.returnValue = "";
  dlg.onclose = async () => {
    if (dlg.returnValue !== "ok") return;
    try {
      const r = await fetch("/_cohort/api/state", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-Cohort-Request": "1" },
        body: JSON.stringify({ server, state: target }),
      });
      const body = await r.json();
      toast(r.ok ? `${server} is now ${body.state}` : `failed: ${body.error}`);
    } catch (err) { toast("failed: " + err); }
  };
  dlg.showModal();
}

// ------------------------------------------------------------------ live updates
function renderAll() { renderLayers(); renderGrid(); renderCharts(); }

function connect() {
  const es = new EventSource("/_cohort/events");
  es.addEventListener("view", (e) => { state.view = JSON.parse(e.data); renderLayers(); renderGrid(); });
  es.addEventListener("events", (e) => { state.events = JSON.parse(e.data); renderEvents(); });
  es.addEventListener("events_new", (e) => {
    const seen = new Set(state.events.map((x) => x.time + x.kind + x.detail));
    for (const x of JSON.parse(e.data)) if (!seen.has(x.time + x.kind + x.detail)) state.events.push(x);
    renderEvents();
  });
  es.addEventListener("history", (e) => { state.history = JSON.parse(e.data); renderAll(); });
  es.addEventListener("stats", (e) => {
    state.history.push(JSON.parse(e.data));
    if (state.history.length > 300) state.history.shift();
    renderLayers(); renderCharts();
  });
  es.onopen = () => { $("#conn").textContent = "live"; };
  es.onerror = async () => {
    $("#conn").textContent = "reconnecting…";
    const r = await fetch("/_cohort/api/view", { credentials: "same-origin" }).catch(() => null);
    if (r && r.status === 401) location.href = "/_cohort/login";
  };
}

window.addEventListener("resize", renderCharts);
connect();
