// The ops dashboard: polls /api/status and /api/dead-letters every few seconds and draws
// them; cancels jobs and batches and redrives failed jobs after a confirmation. No
// framework, no CDN. Job data (errors from the provider, prompts, batch ids) is only
// ever set with textContent. Every POST carries a CSRF token from /api/session.
"use strict";

const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const TERMINAL = ["completed", "failed", "cancelled"];
const ROLES = [["worker", "workers"], ["beat", "beats"], ["receiver", "receivers"]];

const shown = {};  // table id -> the rows it shows now (redrawn only when they change)
let lookedUp = null;  // the job shown in "Job lookup"
let batchShown = null;  // the batch shown under "Running batches"

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
function when(t) { return t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) : "-"; }
function money(v) { return "$" + Number(v).toFixed(2); }
function set(id, value) { $(id).textContent = String(value); }
function plural(n, one, many) { return n + " " + (n === 1 ? one : many); }

function duration(s) {
  if (s === null || s === undefined) return "unknown";
  s = Math.round(s);
  if (s < 60) return s + " s";
  const parts = s < 3600
    ? [[Math.floor(s / 60), "min"], [s % 60, "s"]]
    : [[Math.floor(s / 3600), "h"], [Math.floor((s % 3600) / 60), "min"]];
  return parts.filter(([n], i) => i === 0 || n).map(([n, unit]) => n + " " + unit).join(" ");
}

function button(label, cls, onClick) {
  const b = el("button", label, cls);
  b.type = "button";
  b.addEventListener("click", async () => {
    b.disabled = true;
    try { await onClick(); } finally { b.disabled = false; }
  });
  return b;
}

// One table row: cells are [content, class] where content is text or a DOM node.
function row(cells, data) {
  const tr = el("tr");
  for (const [k, v] of Object.entries(data || {})) tr.dataset[k] = v;
  for (const [content, cls] of cells) {
    const td = el("td", content instanceof Node ? null : content, cls);
    if (content instanceof Node) td.appendChild(content);
    tr.appendChild(td);
  }
  return tr;
}

function fillTable(id, rows, build) {
  const key = JSON.stringify(rows);
  if (shown[id] === key) return;  // unchanged: keep the rows (and the buttons) in place
  shown[id] = key;
  const body = $(id).querySelector("tbody");
  body.replaceChildren();
  if (!rows.length) {
    const td = el("td", "none", "muted");
    td.colSpan = $(id).querySelectorAll("th").length;
    body.appendChild(el("tr")).appendChild(td);
    return;
  }
  for (const r of rows) body.appendChild(build(r));
}

function jobLink(id) { return [id, "mono job-link"]; }

// --- talking to the server -------------------------------------------------------------

async function getJSON(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) { location.href = "/"; throw new Error("logged out"); }
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

// A state-changing request: a fresh CSRF token first, then the POST with it.
async function act(path, body) {
  const session = await getJSON("/api/session");
  const response = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    cache: "no-store",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": session.csrf },
    body: JSON.stringify(body || {}),
  });
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function notice(text, kind) {
  const box = $("notice");
  box.textContent = text;
  box.className = kind || "ok";
  box.hidden = false;
}

// The confirmation step: resolves true only when "Yes" is clicked.
function ask(title, text, yes) {
  const dialog = $("confirm");
  set("confirm-title", title);
  set("confirm-text", text);
  set("confirm-yes", yes);
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise(resolve => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
  });
}

// --- actions ---------------------------------------------------------------------------

async function cancelJob(job) {
  const text = `Cancel job ${job.id} (now ${job.state}${job.batch_id ? ", batch " + job.batch_id : ""})? ` +
    "It will not be submitted; if WaveSpeed already has it, its task is deleted.";
  if (!await ask("Cancel this job?", text, "Yes, cancel the job")) return;
  try {
    await act(`/api/jobs/${job.id}/cancel`);
    notice(`Job ${job.id} cancelled.`);
  } catch (err) {
    notice(`Job ${job.id} not cancelled: ${err.message}`, "error");
  }
  await lookup(job.id);
  refresh();
}

async function cancelBatch(b) {
  const left = b.total - b.terminal;
  const text = `Cancel batch ${b.batch_id}? Its ${plural(left, "job", "jobs")} not finished yet ` +
    `(${b.queued} queued, ${b.in_flight} in flight) will be cancelled; finished ones stay as they are.`;
  if (!await ask("Cancel this batch?", text, "Yes, cancel the batch")) return;
  try {
    const done = await act(`/api/batches/${encodeURIComponent(b.batch_id)}/cancel`);
    notice(`Batch ${b.batch_id}: ${plural(done.cancelled, "job", "jobs")} cancelled.`);
  } catch (err) {
    notice(`Batch ${b.batch_id} not cancelled: ${err.message}`, "error");
  }
  if (batchShown === b.batch_id) showBatch(b.batch_id);
  refresh();
}

async function redrive(ids, what) {
  const text = ids.length === 1
    ? `Enqueue failed job ${ids[0]} again as a new job (${what})? It leaves the dead-letter list.`
    : `Enqueue these ${ids.length} failed jobs again as new jobs (${what})? They leave the dead-letter list.`;
  if (!await ask(ids.length === 1 ? "Redrive this job?" : "Redrive these jobs?", text,
    ids.length === 1 ? "Yes, redrive it" : `Yes, redrive ${ids.length} jobs`)) return;
  try {
    const done = await act("/api/dead-letters/redrive", { job_ids: ids });
    const pairs = Object.entries(done.redriven);
    const skipped = done.unknown.length + done.not_redrivable.length;
    notice(pairs.length === 1
      ? `Job ${pairs[0][0]} redriven as job ${pairs[0][1]}.`
      : `${plural(pairs.length, "job", "jobs")} redriven` + (skipped ? `, ${skipped} skipped.` : "."));
    if (pairs.length === 1) await lookup(pairs[0][1]);
  } catch (err) {
    notice(`Not redriven: ${err.message}`, "error");
  }
  refresh();
}

// --- the page --------------------------------------------------------------------------

function render(s) {
  const jobs = s.jobs;
  for (const k of ["queued", "submitting", "submitted", "completed", "failed", "cancelled"]) {
    set("count-" + k, jobs[k]);
  }
  set("count-due", s.polling.due);
  set("count-due-sub", `of ${s.polling.scheduled} on the poll schedule`);
  set("count-overdue", s.overdue.count);
  set("count-overdue-sub", `in flight past the ${duration(s.deadline_s)} deadline`);
  set("count-dlq", s.dlq);
  const q = s.queues;
  set("count-queue", q["kq"] + q["kq.poll"]);
  set("count-queue-sub", `${q["kq"]} submit · ${q["kq.poll"]} poll · ${q.reserved} taken by workers`);
  set("missed-rate", pct(s.resolution.window.missed_webhook_rate));
  set("latency", secs(s.latency.p50_s));
  set("latency-sub", `95th percentile ${secs(s.latency.p95_s)}, enqueue to result`);
  set("cost", money(s.cost.total_usd));
  set("cost-sub", `${money(s.cost.today_usd)} today`);
  const hb = s.heartbeats;
  set("processes", ROLES.map(([r, many]) => plural(hb[r].length, r, many)).join(" · "));
  $("processes").closest(".card").classList.toggle("bad", ROLES.some(([r]) => !hb[r].length));
  const adm = s.admission;
  set("slots", adm ? adm.slots_used : "-");
  set("slots-sub", adm ? `of ${adm.slots_total}; ${adm.waiting} waiting` : "");
  set("submit-rate", adm ? adm.submits_last_minute : "-");
  set("submit-rate-sub", adm ? `limit ${adm.submits_per_minute_limit} a minute` : "");

  const alarms = $("alarms");
  alarms.replaceChildren();
  if (!s.alarms.length) alarms.appendChild(el("div", "No alarms.", "alarm clear"));
  for (const a of s.alarms) {
    const div = el("div", "ALARM " + a.name + ": " + a.message, "alarm " + a.severity);
    div.dataset.alarm = a.name;
    alarms.appendChild(div);
  }

  fillTable("batches", s.batches || [], batchRow);
  fillTable("overdue", s.overdue.jobs, j => row([
    jobLink(j.job_id), [j.state], [duration(j.age_s)], [j.batch_id || "-", "mono"],
  ]));
  drawChart(s.throughput);
  set("updated", "updated " + when(s.time) + " UTC");
}

function rate(perSecond) {
  if (!perSecond) return "none yet";
  const perMin = perSecond * 60;
  return perMin >= 10 ? Math.round(perMin) + " jobs/min" : perMin.toFixed(1) + " jobs/min";
}

function eta(b) {
  if (b.done) return "done";
  return b.eta_s === null ? "unknown" : "≈ " + duration(b.eta_s);
}

function budget(b) {
  if (b.budget_usd === null) return money(b.cost_usd) + " (no budget)";
  const share = b.budget_usd > 0 ? " (" + Math.round((b.cost_usd / b.budget_usd) * 100) + " %)" : "";
  return money(b.cost_usd) + " of " + money(b.budget_usd) + share;
}

function batchRow(b) {
  const name = el("span", b.batch_id, "mono batch-link");
  name.addEventListener("click", () => showBatch(b.batch_id));
  return row([
    [name],
    [`${b.terminal} of ${b.total}`, "b-done"],
    [b.queued, "num b-queued"],
    [b.in_flight, "num b-in-flight"],
    [b.completed, "num b-completed"],
    [b.failed, "num b-failed"],
    [b.cancelled, "num b-cancelled"],
    [rate(b.rate_per_s), "b-rate"],
    [eta(b), "b-eta"],
    [budget(b), "b-budget"],
    [b.done ? "" : button("Cancel batch…", "danger small b-cancel", () => cancelBatch(b))],
  ], { batch: b.batch_id });
}

async function showBatch(id) {
  id = (id || "").trim();
  if (!id) return;
  batchShown = id;
  $("batch-id").value = id;
  const out = $("batch-result");
  try {
    const b = await getJSON("/api/batches/" + encodeURIComponent(id));
    const p = el("p", null, "batch-summary");
    p.appendChild(el("strong", b.batch_id, "mono"));
    p.appendChild(document.createTextNode(
      ` — ${b.terminal} of ${b.total} finished (${b.completed} completed, ${b.failed} failed, ` +
      `${b.cancelled} cancelled); ${b.queued} queued, ${b.in_flight} in flight; ` +
      `${rate(b.rate_per_s)}, ETA ${eta(b)}; ${budget(b)}  `));
    if (!b.done) p.appendChild(button("Cancel batch…", "danger small", () => cancelBatch(b)));
    out.replaceChildren(p);
  } catch (err) {
    out.replaceChildren(el("p", err.message, "error"));
  }
}

// --- failed jobs -------------------------------------------------------------------------

function deadLettersURL() {
  const params = new URLSearchParams({ limit: "50" });
  if ($("filter-reason").value) params.set("reason", $("filter-reason").value);
  if ($("filter-batch").value) params.set("batch", $("filter-batch").value);
  return "/api/dead-letters?" + params;
}

function fillSelect(id, facets, allLabel) {
  const select = $(id);
  const current = select.value;
  const options = [["", allLabel]].concat(facets.map(f => [f.value, `${f.value} (${f.count})`]));
  if (current && !facets.some(f => f.value === current)) options.push([current, current + " (0)"]);
  const key = JSON.stringify(options);
  if (select.dataset.options === key) return;
  select.dataset.options = key;
  select.replaceChildren(...options.map(([value, label]) => {
    const option = el("option", label);
    option.value = value;
    return option;
  }));
  select.value = current;
}

function renderFailures(d) {
  fillSelect("filter-reason", d.reasons, "all reasons");
  fillSelect("filter-batch", d.batches, "all batches");
  const filtered = d.filters.reason || d.filters.batch_id;
  set("failures-count", filtered
    ? `${d.matching} of ${d.scanned} match` + (d.matching > d.jobs.length ? `, ${d.jobs.length} shown` : "")
    : `${d.total} in the dead-letter list` + (d.total > d.jobs.length ? `, newest ${d.jobs.length} shown` : ""));
  fillTable("failures", d.jobs, f => row([
    jobLink(f.job_id),
    [when(f.time), "nowrap"],
    [f.reason, "reason"],
    [f.batch_id || "-", "mono"],
    [f.error, "err"],
    [button("Redrive…", "small redrive", () => redrive([f.job_id], f.reason))],
  ], { job: f.job_id, reason: f.reason }));
  const shownIds = d.jobs.map(f => f.job_id);
  const all = $("redrive-shown");
  all.disabled = !shownIds.length;
  all.textContent = shownIds.length ? `Redrive ${plural(shownIds.length, "job", "jobs")} shown…` : "Redrive shown";
  all.dataset.ids = shownIds.join(",");
  all.dataset.what = [d.filters.reason || "any reason", d.filters.batch_id ? "batch " + d.filters.batch_id : "any batch"].join(", ");
}

async function refreshFailures() {
  try {
    renderFailures(await getJSON(deadLettersURL()));
  } catch (err) {
    set("failures-count", "cannot load: " + err.message);
  }
}

// --- the chart ---------------------------------------------------------------------------

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
    render(await getJSON("/api/status"));
    set("conn", "");
  } catch (err) {
    set("conn", "cannot refresh: " + err.message);
  }
  await refreshFailures();
  const out = $("job-result");
  if (lookedUp && out.dataset.state && !TERMINAL.includes(out.dataset.state)) {
    await lookup(lookedUp, true).catch(() => {});
  }
}

// --- job lookup --------------------------------------------------------------------------

function pollsLine(job, polls) {
  const li = el("li", null, "polls");
  li.appendChild(el("span", "(poll times not recorded)  ", "mono muted"));
  li.appendChild(el("strong", "polled " + plural(polls.count, "time", "times")));
  let detail = "  by the fallback poller";
  if (job.resolved_by) detail += `; the result came by ${job.resolved_by}`;
  if (polls.next_at) detail += `; it looks at the job next at ${when(polls.next_at)}`;
  li.appendChild(document.createTextNode(detail));
  return li;
}

// Show a job; `quiet` (the periodic refresh of a live job) redraws only what changed.
// A step job's chain: its state and each step job (click one to look it up).
function chainPanel(chain, current) {
  const box = el("div", null, "chain");
  box.id = "job-chain";
  const head = el("p");
  head.appendChild(document.createTextNode("chain "));
  head.appendChild(el("strong", chain.id, "mono"));
  head.appendChild(document.createTextNode(" — " + chain.state + ", " + plural(chain.steps, "step", "steps") +
    (chain.run > 1 ? ", run " + chain.run : "")));
  box.appendChild(head);
  const table = el("table");
  const body = el("tbody");
  chain.jobs.forEach(j => {
    const cells = [["step " + j.step + (j.branch && j.branch !== "1" ? " (" + j.branch + ")" : "")],
      [j.job_id, "mono job-link" + (j.job_id === current ? " current" : "")], [j.state]];
    body.appendChild(row(cells, { state: j.state }));
  });
  table.appendChild(body);
  box.appendChild(table);
  return box;
}

async function lookup(id, quiet) {
  id = (id || "").trim().toLowerCase();
  const out = $("job-result");
  if (!quiet) {
    lookedUp = id;
    $("job-id").value = id;
    delete out.dataset.shown;
    out.replaceChildren(el("p", "loading " + id + "…", "muted"));
  }
  const response = await fetch("/api/jobs/" + encodeURIComponent(id), { credentials: "same-origin", cache: "no-store" });
  const data = await response.json();
  if (lookedUp !== id) return;  // another job was asked for meanwhile
  const key = JSON.stringify(data);
  if (quiet && out.dataset.shown === key) return;
  out.dataset.shown = key;
  out.replaceChildren();
  delete out.dataset.state;
  if (!response.ok) { out.appendChild(el("p", data.error, "error")); return; }
  const job = data.job;
  out.dataset.state = job.state;
  const head = el("p");
  head.appendChild(el("strong", job.id, "mono"));
  head.appendChild(document.createTextNode(" — " + job.state + (job.reason ? " (" + job.reason + ")" : "")));
  head.id = "job-state";
  head.dataset.state = job.state;
  out.appendChild(head);

  const actions = el("p", null, "actions");
  const terminal = TERMINAL.includes(job.state);
  if (!terminal) {
    const b = button("Cancel job…", "danger", () => cancelJob(job));
    b.id = "job-cancel";
    actions.appendChild(b);
  }
  if (job.state === "failed" || job.state === "cancelled") {
    const b = button("Redrive…", "", () => redrive([job.id], job.reason || job.state));
    b.id = "job-redrive";
    actions.appendChild(b);
  }
  if (job.batch_id) actions.appendChild(button("Show batch " + job.batch_id, "", () => showBatch(job.batch_id)));
  if (data.in_dead_letters) actions.appendChild(el("span", "  in the dead-letter list", "muted"));
  out.appendChild(actions);

  if (data.chain) out.appendChild(chainPanel(data.chain, job.id));

  const list = el("ol", null, "timeline");
  data.timeline.forEach((step, i) => {
    if (i === data.timeline.length - 1 && data.timeline.length > 1) list.appendChild(pollsLine(job, data.polls));
    const li = el("li");
    li.appendChild(el("span", when(step.t) + "  ", "mono"));
    li.appendChild(el("strong", step.step));
    li.appendChild(document.createTextNode("  " + step.detail));
    list.appendChild(li);
  });
  if (data.timeline.length < 2) list.appendChild(pollsLine(job, data.polls));
  out.appendChild(list);
  const details = el("pre", JSON.stringify({ job: job, event: data.event }, null, 2), "mono");
  out.appendChild(details);
}

document.addEventListener("DOMContentLoaded", () => {
  $("lookup").addEventListener("submit", ev => { ev.preventDefault(); lookup($("job-id").value); });
  $("batch-lookup").addEventListener("submit", ev => { ev.preventDefault(); showBatch($("batch-id").value); });
  $("confirm-yes").addEventListener("click", () => $("confirm").close("yes"));
  $("confirm-no").addEventListener("click", () => $("confirm").close("no"));
  for (const id of ["filter-reason", "filter-batch"]) $(id).addEventListener("change", refreshFailures);
  $("redrive-shown").addEventListener("click", () => {
    const ids = ($("redrive-shown").dataset.ids || "").split(",").filter(Boolean);
    if (ids.length) redrive(ids, $("redrive-shown").dataset.what);
  });
  document.addEventListener("click", ev => {
    const cell = ev.target.closest && ev.target.closest("td.job-link");
    if (cell) lookup(cell.textContent);
  });
  const m = location.hash.match(/job=([0-9a-fA-F]{32})/);
  if (m) lookup(m[1]);
  refresh();
  setInterval(refresh, REFRESH_MS);
});
