// Status page of `monolith up`: polls the supervisor's JSON API and draws inline SVG.
// No external resources. Each chart <figure> gets data-points = number of points drawn,
// the timeline data-snapshots/data-events, the roles table data-rows (tests read these).
"use strict";

const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2",
                "#ca8a04", "#db2777", "#4b5563", "#65a30d"];
const MAX_POINTS = 900;
const W = 560, H = 200, PAD = {l: 52, r: 10, t: 8, b: 22};

const store = {};          // series name -> [[t, v], ...]
let lastT = null;          // newest point time we hold
let lastSeq = 0;           // newest event we hold
let events = [];
let t0 = null;             // first time seen (x axis origin)

function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}

function fmt(v) {
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
  if (a >= 100) return v.toFixed(0);
  if (a >= 1) return v.toFixed(1);
  return v.toFixed(3);
}

function clock(s) {
  s = Math.max(0, Math.round(s));
  return Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
}

async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store"});
  if (!r.ok) throw new Error(url + " " + r.status);
  return r.json();
}

function merge(update) {
  for (const name in update) {
    const pts = store[name] || (store[name] = []);
    for (const p of update[name]) {
      if (!pts.length || p[0] > pts[pts.length - 1][0]) pts.push(p);
      if (lastT === null || p[0] > lastT) lastT = p[0];
      if (t0 === null || p[0] < t0) t0 = p[0];
    }
    if (pts.length > MAX_POINTS) pts.splice(0, pts.length - MAX_POINTS);
  }
}

function matching(prefixes) {
  const out = [];
  for (const name of Object.keys(store).sort()) {
    if (prefixes.some(p => name === p || name.startsWith(p))) out.push(name);
  }
  return out;
}

function xRange() {
  let lo = Infinity, hi = -Infinity;
  for (const name in store) {
    const pts = store[name];
    if (pts.length) { lo = Math.min(lo, pts[0][0]); hi = Math.max(hi, pts[pts.length - 1][0]); }
  }
  if (!isFinite(lo)) return null;
  if (hi - lo < 10) hi = lo + 10;
  return [lo, hi];
}

function eventMarks(svg, xr, sx) {
  for (const e of events) {
    if (!["died", "hung", "chaos"].includes(e.kind)) continue;
    const x = sx(e.t);
    if (x < PAD.l || x > W - PAD.r) continue;
    const line = el("line", {x1: x, x2: x, y1: PAD.t, y2: H - PAD.b,
      stroke: e.kind === "chaos" ? "#7c3aed" : "#dc2626", "stroke-dasharray": "2,3",
      "stroke-width": 1, "class": "event-mark"}, svg);
    el("title", {}, line).textContent = e.kind + " " + (e.role || "") + ": " + e.message;
  }
}

function drawChart(fig, xr) {
  const prefixes = fig.dataset.series.split(",");
  const names = matching(prefixes);
  fig.textContent = "";
  const cap = document.createElement("figcaption");
  cap.textContent = fig.dataset.title;
  fig.appendChild(cap);
  let points = 0, lo = Infinity, hi = -Infinity;
  for (const n of names) for (const p of store[n]) { lo = Math.min(lo, p[1]); hi = Math.max(hi, p[1]); points++; }
  fig.dataset.points = String(points);
  fig.dataset.lines = String(names.length);
  if (!points || !xr) {
    const p = document.createElement("div");
    p.className = "empty";
    p.textContent = "no data yet";
    fig.appendChild(p);
    return;
  }
  if (lo === hi) { lo -= 1; hi += 1; }
  const span = hi - lo;
  lo = lo >= 0 && lo - 0.05 * span < 0 ? 0 : lo - 0.05 * span;
  hi += 0.05 * span;
  const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, role: "img"});
  fig.appendChild(svg);
  const sx = t => PAD.l + (t - xr[0]) / (xr[1] - xr[0]) * (W - PAD.l - PAD.r);
  const sy = v => H - PAD.b - (v - lo) / (hi - lo) * (H - PAD.t - PAD.b);
  for (let i = 0; i <= 4; i++) {
    const v = lo + (hi - lo) * i / 4, y = sy(v);
    el("line", {x1: PAD.l, x2: W - PAD.r, y1: y, y2: y, stroke: "#e4e4e4"}, svg);
    el("text", {x: PAD.l - 4, y: y + 3, "text-anchor": "end"}, svg).textContent = fmt(v);
  }
  for (let i = 0; i <= 4; i++) {
    const t = xr[0] + (xr[1] - xr[0]) * i / 4;
    el("text", {x: sx(t), y: H - 6, "text-anchor": "middle"}, svg).textContent = clock(t - t0);
  }
  eventMarks(svg, xr, sx);
  const legend = document.createElement("div");
  legend.className = "legend";
  names.forEach((n, i) => {
    const color = COLORS[i % COLORS.length];
    const pts = store[n].map(p => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ");
    const line = el("polyline", {points: pts, fill: "none", stroke: color, "stroke-width": 1.6,
                                 "data-series": n, "data-points": store[n].length}, svg);
    el("title", {}, line).textContent = n;
    const last = store[n][store[n].length - 1][1];
    const item = document.createElement("span");
    const sw = document.createElement("i");
    sw.style.background = color;
    item.appendChild(sw);
    item.appendChild(document.createTextNode(n + " = " + fmt(last)));
    legend.appendChild(item);
  });
  fig.appendChild(legend);
}

function drawTimeline(status, xr) {
  const fig = document.getElementById("timeline");
  const snaps = status.snapshots || [];
  fig.textContent = "";
  fig.dataset.snapshots = String(snaps.length);
  const marks = events.filter(e => ["died", "hung", "chaos", "recovered", "restore"].includes(e.kind));
  fig.dataset.events = String(marks.length);
  if (!xr) { fig.textContent = "no data yet"; return; }
  const h = 86, svg = el("svg", {viewBox: `0 0 ${W * 2} ${h}`, role: "img"});
  fig.appendChild(svg);
  const sx = t => PAD.l + (t - xr[0]) / (xr[1] - xr[0]) * (W * 2 - PAD.l - PAD.r);
  el("text", {x: 4, y: 26}, svg).textContent = "snapshots";
  el("text", {x: 4, y: 60}, svg).textContent = "events";
  el("line", {x1: PAD.l, x2: W * 2 - PAD.r, y1: 22, y2: 22, stroke: "#e4e4e4"}, svg);
  el("line", {x1: PAD.l, x2: W * 2 - PAD.r, y1: 56, y2: 56, stroke: "#e4e4e4"}, svg);
  for (const s of snaps) {
    const x = sx(s.t);
    if (x < PAD.l - 2) continue;
    const r = el("rect", {x: x - 3, y: 14, width: 6, height: 16, fill: s.kinds.includes("full") ? "#0369a1" : "#7dd3fc",
                          "class": "snapshot-mark"}, svg);
    el("title", {}, r).textContent = `snapshot ${s.id}: step ${s.step}, ${(s.bytes / 1e6).toFixed(2)} MB, ${s.kinds.join("+")}`;
  }
  const colors = {died: "#dc2626", hung: "#dc2626", chaos: "#7c3aed", recovered: "#16a34a", restore: "#b45309"};
  for (const e of marks) {
    const x = sx(e.t);
    if (x < PAD.l - 2) continue;
    const c = el("circle", {cx: x, cy: 56, r: 4, fill: colors[e.kind]}, svg);
    el("title", {}, c).textContent = `${clock(e.t - t0)} ${e.kind} ${e.role || ""}: ${e.message}`;
  }
  for (let i = 0; i <= 8; i++) {
    const t = xr[0] + (xr[1] - xr[0]) * i / 8;
    el("text", {x: sx(t), y: h - 4, "text-anchor": "middle"}, svg).textContent = clock(t - t0);
  }
}

function drawRoles(status) {
  const body = document.querySelector("#roles tbody");
  body.textContent = "";
  for (const r of status.roles) {
    const tr = document.createElement("tr");
    if (r.straggler) tr.className = "straggler";
    const cells = [r.name + (r.straggler ? " (straggler)" : ""), r.host === null ? "infra" : "host " + r.host,
                   r.status, r.pid ?? "", r.restarts,
                   r.beat_age_s === null ? "" : r.beat_age_s + " s ago", r.uptime_s === null ? "" : clock(r.uptime_s)];
    cells.forEach((c, i) => {
      const td = document.createElement("td");
      td.textContent = String(c);
      if (i === 2) td.className = "st-" + r.status;
      tr.appendChild(td);
    });
    body.appendChild(tr);
  }
  document.getElementById("roles").dataset.rows = String(status.roles.length);
}

function drawEvents() {
  const ol = document.getElementById("events");
  ol.textContent = "";
  for (const e of events.slice(-300).reverse()) {
    const li = document.createElement("li");
    li.className = "ev-" + e.kind;
    li.textContent = `${clock(e.elapsed)}  ${e.kind}  ${e.role || ""}  ${e.message}`;
    ol.appendChild(li);
  }
  ol.dataset.count = String(events.length);
}

function drawSummary(status) {
  const s = document.getElementById("summary");
  const x = status.extra || {};
  const last = (status.snapshots || []).slice(-1)[0];
  const items = [["phase", status.phase], ["elapsed", clock(status.elapsed_s)],
                 ["trained", x.trained ?? "–"], ["AUC", x.auc != null ? x.auc.toFixed(4) : "–"],
                 ["restarts", status.restarts], ["snapshots", (status.snapshots || []).length],
                 ["last snapshot", last ? `#${last.id} step ${last.step}` : "–"]];
  if (status.chaos) items.push(["chaos kills", status.chaos.kills]);
  if (status.fatal) items.push(["FAILED", status.fatal]);
  s.textContent = "";
  for (const [k, v] of items) {
    const span = document.createElement("span");
    span.innerHTML = "";
    span.appendChild(document.createTextNode(k + ": "));
    const b = document.createElement("b");
    b.textContent = String(v);
    span.appendChild(b);
    s.appendChild(span);
  }
  s.dataset.phase = status.phase;
}

async function refresh() {
  try {
    const [status, series, evs] = await Promise.all([
      getJSON("api/status"),
      getJSON("api/series" + (lastT === null ? "" : "?since=" + lastT)),
      getJSON("api/events?since=" + lastSeq)]);
    merge(series);
    for (const e of evs) { events.push(e); lastSeq = Math.max(lastSeq, e.seq); }
    if (events.length > 2000) events = events.slice(-2000);
    const xr = xRange();
    for (const fig of document.querySelectorAll("figure.chart")) drawChart(fig, xr);
    drawTimeline(status, xr);
    drawRoles(status);
    drawEvents();
    drawSummary(status);
    document.body.dataset.updated = String(Date.now());
  } catch (err) {
    document.getElementById("footer").textContent = "status unavailable: " + err;
  }
}

refresh();
setInterval(refresh, 2000);
