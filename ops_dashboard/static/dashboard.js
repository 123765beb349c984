// The ops dashboard: polls /api/status every few seconds and draws it. No framework, no
// CDN. Job data (errors from the provider, prompts) is only ever set with textContent.
"use strict";

const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";

function $(id) { return document.getElementById(id); }

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function secs(v) { return v === null || v === undefined ? "-" : v.toFixed(1) + " s"; }
function pct(v) { return v === null || v === undefined ? "-" : Math.round(v * 100) + " %"; }
function when(t) { return new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19); }
function set(id, value) { $(id).textContent = String(value); }

function fillTable(id, rows, cells) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren();
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", "none", "muted");
    td.colSpan = $(id).querySelectorAll("th").length;
    tr.appendChild(td);
    body.appendChild(tr);
    return;
  }
  for (const row of rows) {
    const tr = el("tr");
    for (const [text, cls] of cells(row)) tr.appendChild(el("td", text, cls));
    body.appendChild(tr);
  }
}

function jobLink(id) {
  return [id, "mono job-link"];
}

function render(s) {
  const jobs = s.jobs;
  for (const k of ["queued", "submitting", "submitted", "completed", "failed", "cancelled"]) {
    set("count-" + k, jobs[k]);
  }
  set("count-due", s.polling.due + " / " + s.polling.scheduled);
  set("count-overdue", s.overdue.count);
  set("count-dlq", s.dlq);
  set("count-queue", s.queues["kq"] + s.queues["kq.poll"] + " (+" + s.queues.reserved + ")");
  set("missed-rate", pct(s.resolution.window.missed_webhook_rate));
  set("latency", secs(s.latency.p50_s) + " / " + secs(s.latency.p95_s));
  set("cost", "$" + s.cost.total_usd.toFixed(2) + " / $" + s.cost.today_usd.toFixed(2));
  const hb = s.heartbeats;
  set("processes", ["worker", "beat", "receiver"].map(r => r[0].toUpperCase() + hb[r].length).join(" "));
  $("processes").title = "workers / beats / receivers with a live heartbeat";
  const adm = s.admission;
  set("slots", adm ? adm.slots_used + " / " + adm.slots_total : "-");
  set("submit-rate", adm ? adm.submits_last_minute + " / " + adm.submits_per_minute_limit : "-");
  $("slots").title = adm ? adm.waiting + " jobs waiting for a slot" : "";

  const alarms = $("alarms");
  alarms.replaceChildren();
  if (!s.alarms.length) alarms.appendChild(el("div", "No alarms.", "alarm clear"));
  for (const a of s.alarms) {
    const div = el("div", "ALARM " + a.name + ": " + a.message, "alarm " + a.severity);
    div.dataset.alarm = a.name;
    alarms.appendChild(div);
  }

  fillTable("batches", s.cost.running_batches, b => [
    [b.batch_id, "mono"], [b.terminal + "/" + b.total], [b.completed], [b.failed],
    ["$" + b.cost_usd.toFixed(2)],
  ]);
  fillTable("overdue", s.overdue.jobs, j => [jobLink(j.job_id), [j.state], [secs(j.age_s)], [j.batch_id, "mono"]]);
  fillTable("failures", s.failures, f => [
    jobLink(f.job_id), [when(f.time)], [f.reason], [f.error, "err"],
  ]);
  for (const cell of document.querySelectorAll("td.job-link")) {
    cell.addEventListener("click", () => lookup(cell.textContent));
  }
  drawChart(s.throughput);
  set("updated", "updated " + when(s.time) + " UTC");
}

function drawChart(series) {
  const W = 900, H = 220, L = 40, R = 50, T = 10, B = 24;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", id: "chart-svg" });
  const n = series.length || 1;
  const totals = series.map(p => p.completed + p.failed + p.cancelled);
  const maxCount = Math.max(1, ...totals);
  const lat = series.map(p => p.p50_s).filter(v => v !== null);
  const maxLat = Math.max(1, ...lat);
  const bw = (W - L - R) / n;
  const y = v => H - B - (v / maxCount) * (H - T - B);
  const yl = v => H - B - (v / maxLat) * (H - T - B);
  root.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#9ca3af" }));
  for (const [v, label] of [[maxCount, maxCount], [0, 0]]) {
    const t = svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#6b7280" });
    t.textContent = String(label);
    root.appendChild(t);
  }
  const tl = svg("text", { x: W - R + 6, y: T + 10, "font-size": 11, fill: "#2563eb" });
  tl.textContent = maxLat.toFixed(0) + " s";
  root.appendChild(tl);
  const colors = { completed: "#22c55e", failed: "#ef4444", cancelled: "#a3a3a3" };
  let bars = 0;
  series.forEach((p, i) => {
    let base = 0;
    for (const state of ["completed", "failed", "cancelled"]) {
      if (!p[state]) continue;
      const rect = svg("rect", {
        x: L + i * bw + 1, width: Math.max(1, bw - 2),
        y: y(base + p[state]), height: y(base) - y(base + p[state]), fill: colors[state],
      });
      rect.dataset.state = state;
      const title = svg("title");
      title.textContent = `${when(p.t).slice(11, 16)}: ${p[state]} ${state}`;
      rect.appendChild(title);
      root.appendChild(rect);
      base += p[state];
      bars += 1;
    }
  });
  const pts = series.map((p, i) => p.p50_s === null ? null : `${L + i * bw + bw / 2},${yl(p.p50_s)}`).filter(Boolean);
  if (pts.length > 1) {
    root.appendChild(svg("polyline", { points: pts.join(" "), fill: "none", stroke: "#2563eb", "stroke-width": 2 }));
  }
  if (series.length) {
    for (const i of [0, series.length - 1]) {
      const t = svg("text", { x: L + i * bw + bw / 2, y: H - 6, "font-size": 11, fill: "#6b7280", "text-anchor": "middle" });
      t.textContent = when(series[i].t).slice(11, 16);
      root.appendChild(t);
    }
  }
  root.dataset.bars = String(bars);
  $("chart").replaceChildren(root);
}

async function refresh() {
  try {
    const response = await fetch("/api/status", { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) { location.href = "/"; return; }
    if (!response.ok) throw new Error((await response.json()).error || response.statusText);
    render(await response.json());
    set("conn", "");
  } catch (err) {
    set("conn", "cannot refresh: " + err.message);
  }
}

async function lookup(id) {
  id = (id || "").trim().toLowerCase();
  $("job-id").value = id;
  const out = $("job-result");
  out.replaceChildren(el("p", "loading " + id + "…", "muted"));
  const response = await fetch("/api/jobs/" + encodeURIComponent(id), { credentials: "same-origin" });
  const data = await response.json();
  out.replaceChildren();
  if (!response.ok) { out.appendChild(el("p", data.error, "error")); return; }
  const job = data.job;
  const head = el("p");
  head.appendChild(el("strong", job.id, "mono"));
  head.appendChild(document.createTextNode(" — " + job.state + (job.reason ? " (" + job.reason + ")" : "")));
  head.id = "job-state";
  head.dataset.state = job.state;
  out.appendChild(head);
  const list = el("ol", null, "timeline");
  for (const step of data.timeline) {
    const li = el("li");
    li.appendChild(el("span", when(step.t) + "  ", "mono"));
    li.appendChild(el("strong", step.step));
    li.appendChild(document.createTextNode("  " + step.detail));
    list.appendChild(li);
  }
  out.appendChild(list);
  const details = el("pre", JSON.stringify({ job: job, event: data.event }, null, 2), "mono");
  out.appendChild(details);
}

document.addEventListener("DOMContentLoaded", () => {
  $("lookup").addEventListener("submit", ev => { ev.preventDefault(); lookup($("job-id").value); });
  const m = location.hash.match(/job=([0-9a-fA-F]{32})/);
  if (m) lookup(m[1]);
  refresh();
  setInterval(refresh, REFRESH_MS);
});
