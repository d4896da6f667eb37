// The Tollgate console: every figure comes from the admin API (/admin/usage, /admin/budgets,
// /admin/keys, /admin/overview, /status), read with the session cookie; changes carry the
// session's CSRF token. No framework and no third-party code: the gateway serves this file
// from its binary.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const $ = (sel, root = document) => root.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";

// Money is nano-dollars (integers) from the API; shown as the API's own decimal strings.
function usd(nanos) {
  const n = BigInt(nanos);
  const whole = n / 1000000000n;
  const frac = (n % 1000000000n).toString().padStart(9, "0").replace(/0+$/, "");
  return frac ? `${whole}.${frac}` : `${whole}`;
}
const money = (s) => `$${s}`;
const fmtInt = (n) => Number(n).toLocaleString("en-US");

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k.startsWith("data-") || k.startsWith("aria-") || k === "role" || k === "scope") e.setAttribute(k, v);
    else if (k === "class") e.className = v;
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs = {}) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function say(text) {
  $("#status").textContent = text;
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (options.method && options.method !== "GET") {
    headers["x-csrf-token"] = csrf;
    headers["content-type"] = "application/json";
  }
  const resp = await fetch(path, { ...options, headers, credentials: "same-origin" });
  if (resp.status === 401) {
    // The session ended (expired, or the admin token changed): back to the sign-in form.
    window.location.assign("/console");
    throw new Error("signed out");
  }
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body?.error?.message || `${path}: ${resp.status}`);
  return body;
}

// ---- Tabs (arrow keys move between them, as the ARIA tabs pattern has it) ----

const tabs = ["spend", "budgets", "keys", "providers"];
const loaders = {};

function show(name, focus) {
  for (const t of tabs) {
    const on = t === name;
    const tab = $(`#tab-${t}`);
    tab.setAttribute("aria-selected", on);
    tab.tabIndex = on ? 0 : -1;
    $(`#${t}`).hidden = !on;
    if (on && focus) tab.focus();
  }
  loaders[name]().catch((e) => say(e.message));
}

for (const t of tabs) {
  const tab = $(`#tab-${t}`);
  tab.addEventListener("click", () => show(t, false));
  tab.addEventListener("keydown", (e) => {
    const i = tabs.indexOf(t);
    if (e.key === "ArrowRight") show(tabs[(i + 1) % tabs.length], true);
    if (e.key === "ArrowLeft") show(tabs[(i + tabs.length - 1) % tabs.length], true);
  });
}

$("#logout").addEventListener("submit", async (e) => {
  e.preventDefault();
  await fetch("/console/logout", { method: "POST", headers: { "x-csrf-token": csrf }, credentials: "same-origin" });
  window.location.assign("/console");
});

// ---- Spend ----

const PALETTE = ["#2f6fde", "#e0793a", "#2e9d6b", "#b9467a", "#7b5cd6", "#c2a12b", "#3aa4b8", "#8a8a8a"];

function isoDay(d) {
  return d.toISOString().slice(0, 10);
}

loaders.spend = async function loadSpend() {
  const section = $("#spend");
  section.dataset.loaded = "false";
  const group = $("#spend-group").value;
  const days = Number($("#spend-range").value);
  const from = new Date(Date.now() - (days - 1) * 86400000);
  const q = `from=${isoDay(from)}`;
  const [daily, totals, all] = await Promise.all([
    api(`/admin/usage?group_by=day,${group}&${q}`),
    api(`/admin/usage?group_by=${group}&${q}`),
    api(`/admin/usage?${q}`),
  ]);
  drawChart(daily.rows, group, from, days);
  const total = $("#spend-total");
  total.dataset.usd = all.total_cost_usd;
  total.textContent = money(all.total_cost_usd);

  const body = $("#top-spenders tbody");
  body.replaceChildren();
  for (const r of totals.rows.slice(0, 20)) {
    const name = r.group[group] ?? "(none)";
    body.append(
      el("tr", { "data-name": name, "data-usd": r.cost_usd, "data-requests": r.requests, "data-estimated": r.estimated },
        el("th", { scope: "row" }, name),
        el("td", {}, fmtInt(r.requests)),
        el("td", {}, money(r.cost_usd)),
        el("td", {}, r.estimated > 0 ? `≈ ${fmtInt(r.estimated)}` : "0")),
    );
  }

  const t = all.rows[0] || { input_tokens: 0, output_tokens: 0, cache_read_tokens: 0, cache_write_5m_tokens: 0, cache_write_1h_tokens: 0 };
  const write = t.cache_write_5m_tokens + t.cache_write_1h_tokens;
  const tokens = $("#tokens");
  tokens.dataset.input = t.input_tokens;
  tokens.dataset.output = t.output_tokens;
  tokens.dataset.cacheRead = t.cache_read_tokens;
  tokens.dataset.cacheWrite = write;
  tokens.replaceChildren(
    el("dt", {}, "Input"), el("dd", {}, fmtInt(t.input_tokens)),
    el("dt", {}, "Output"), el("dd", {}, fmtInt(t.output_tokens)),
    el("dt", {}, "Cache reads"), el("dd", {}, fmtInt(t.cache_read_tokens)),
    el("dt", {}, "Cache writes"), el("dd", {}, fmtInt(write)),
  );
  const prompt = t.input_tokens + t.cache_read_tokens + write;
  const ratio = prompt > 0 ? t.cache_read_tokens / prompt : 0;
  const hit = $("#cache-hit-ratio");
  hit.dataset.ratio = String(ratio);
  hit.textContent = prompt > 0 ? `${(ratio * 100).toFixed(1)} %` : "–";
  section.dataset.loaded = "true";
  say("");
};

function drawChart(rows, group, from, days) {
  const chart = $("#spend-chart");
  const title = $("#spend-chart-title");
  chart.replaceChildren(title);
  // The eight dearest groups get a colour each; the rest share the last.
  const byGroup = new Map();
  for (const r of rows) {
    const g = r.group[group] ?? "(none)";
    byGroup.set(g, (byGroup.get(g) || 0) + r.cost_nanos);
  }
  const order = [...byGroup.entries()].sort((a, b) => b[1] - a[1]).map(([g]) => g);
  const colour = (g) => PALETTE[Math.min(order.indexOf(g), PALETTE.length - 1)];
  const dayList = [];
  for (let i = 0; i < days; i++) dayList.push(isoDay(new Date(from.getTime() + i * 86400000)));
  const perDay = new Map(dayList.map((d) => [d, []]));
  for (const r of rows) {
    const list = perDay.get(r.group.day);
    if (list) list.push(r);
  }
  const max = Math.max(1, ...[...perDay.values()].map((l) => l.reduce((s, r) => s + r.cost_nanos, 0)));
  const W = 900, H = 240, pad = 4;
  const bw = W / days;
  chart.append(svg("line", { x1: 0, y1: H, x2: W, y2: H, class: "axis" }));
  dayList.forEach((day, i) => {
    let y = H;
    const list = perDay.get(day).sort((a, b) => order.indexOf(a.group[group] ?? "(none)") - order.indexOf(b.group[group] ?? "(none)"));
    for (const r of list) {
      const g = r.group[group] ?? "(none)";
      const h = (r.cost_nanos / max) * (H - pad);
      y -= h;
      const rect = svg("rect", {
        class: "bar", x: i * bw + 1, y, width: Math.max(1, bw - 2), height: Math.max(h, 0.5), fill: colour(g),
        "data-day": day, "data-group": g, "data-usd": r.cost_usd,
      });
      const t = svg("title", {});
      t.textContent = `${day} · ${g}: ${money(r.cost_usd)} (${fmtInt(r.requests)} requests)`;
      rect.append(t);
      chart.append(rect);
    }
    // A label every day of a week, every third day of a month, every week beyond.
    const every = days <= 10 ? 1 : days <= 31 ? 3 : 7;
    if ((days - 1 - i) % every === 0) {
      const label = svg("text", { x: i * bw + bw / 2, y: H + 14, class: "tick", "text-anchor": "middle" });
      label.textContent = day.slice(5);
      chart.append(label);
    }
  });
  const legend = $("#spend-legend");
  legend.replaceChildren(...order.slice(0, PALETTE.length).map((g, i) => {
    const chip = el("i", { "aria-hidden": "true" });
    // Through the CSSOM: the page's CSP allows no style attributes.
    chip.style.backgroundColor = PALETTE[i];
    return el("span", { class: "swatch", "data-group": g }, chip, g);
  }));
  title.textContent = `Spend per day by ${group}, largest day ${money(usd(max))}`;
}

$("#spend-group").addEventListener("change", () => loaders.spend().catch((e) => say(e.message)));
$("#spend-range").addEventListener("change", () => loaders.spend().catch((e) => say(e.message)));

// ---- Budgets ----

loaders.budgets = async function loadBudgets() {
  const section = $("#budgets");
  section.dataset.loaded = "false";
  const [{ budgets }, overview] = await Promise.all([api("/admin/budgets"), api("/admin/overview")]);
  const list = $("#budget-list");
  list.replaceChildren();
  const now = Date.now();
  for (const b of budgets) {
    const s = b.budget;
    if (!s) continue;
    const limit = Number(s.limit_usd), spent = Number(s.spent_usd), reserved = Number(s.reserved_usd);
    const share = limit > 0 ? Math.min(1, spent / limit) : 0;
    let projection = "no spend yet this period";
    if (spent >= limit) projection = "spent: requests are refused until it resets";
    else if (spent > 0 && s.period_start && s.resets_at) {
      const start = Date.parse(s.period_start), end = Date.parse(s.resets_at);
      const rate = spent / Math.max(1, now - start);
      const out = now + (limit - spent) / rate;
      projection = out < end
        ? `on course to run out ${new Date(out).toISOString().slice(0, 16).replace("T", " ")} UTC, before it resets`
        : "on course to last the period";
    } else if (spent > 0) projection = "lifetime budget";
    const meter = el("meter", { min: 0, max: 1, value: share, high: 0.8, optimum: 0, "aria-label": `${b.scope} ${b.id} spent` });
    list.append(el("li", { class: "budget", "data-scope": b.scope, "data-id": b.id, "data-spent-usd": s.spent_usd, "data-limit-usd": s.limit_usd },
      el("h3", {}, `${b.scope} ${b.id}`),
      meter,
      el("p", {}, `${money(s.spent_usd)} of ${money(s.limit_usd)} ${s.period}`,
        reserved > 0 ? `, ${money(s.reserved_usd)} held by requests in flight` : "",
        s.resets_at ? `; resets ${s.resets_at}` : ""),
      el("p", { class: "projection" }, projection)));
  }
  if (!list.children.length) list.append(el("li", {}, "No budgets are set."));
  const refusals = $("#refusals");
  refusals.replaceChildren();
  for (const r of overview.counters.tollgate_refused_total || []) {
    refusals.append(el("li", { "data-reason": r.labels.reason, "data-count": r.value }, `${r.labels.reason}: ${fmtInt(r.value)}`));
  }
  if (!refusals.children.length) refusals.append(el("li", {}, "None."));
  section.dataset.loaded = "true";
};

// ---- Keys ----

function limitsText(l) {
  if (!l) return "";
  return Object.entries(l).filter(([, v]) => v != null).map(([k, v]) => `${k} ${v}`).join(", ");
}

// A stored key's budget as it was set, or (a key from the config file) as the limiter holds it.
function budgetText(k) {
  if (k.budget) return `${money(k.budget.usd)} ${k.budget.period}`;
  const b = k.status?.budget;
  return b ? `${money(b.limit_usd)} ${b.period}` : "";
}

function showSecret(secret) {
  $("#secret-value").textContent = secret;
  $("#secret-dialog").showModal();
}
$("#secret-close").addEventListener("click", () => {
  $("#secret-value").textContent = "";
  $("#secret-dialog").close();
});

loaders.keys = async function loadKeys() {
  const section = $("#keys");
  section.dataset.loaded = "false";
  const { keys } = await api("/admin/keys");
  const body = $("#key-table tbody");
  body.replaceChildren();
  for (const k of keys) {
    const fromFile = k.source === "config";
    const actions = el("td", {});
    if (fromFile) actions.append("in the config file");
    else {
      const toggle = el("button", { type: "button", class: k.disabled ? "enable" : "disable" }, k.disabled ? "Enable" : "Disable");
      toggle.addEventListener("click", () => change(`/admin/keys/${encodeURIComponent(k.id)}/${k.disabled ? "enable" : "disable"}`));
      const rotate = el("button", { type: "button", class: "rotate" }, "Rotate");
      rotate.addEventListener("click", async () => {
        if (!confirm(`Rotate ${k.id}? Its current secret stops working.`)) return;
        const r = await api(`/admin/keys/${encodeURIComponent(k.id)}/rotate`, { method: "POST", body: "{}" });
        showSecret(r.secret);
        loaders.keys();
      });
      const edit = el("button", { type: "button", class: "edit" }, "Edit");
      edit.addEventListener("click", () => editKey(k));
      actions.append(toggle, rotate, edit);
    }
    const spent = k.status?.budget?.spent_usd;
    body.append(el("tr", { "data-key-id": k.id, "data-disabled": k.disabled },
      el("th", { scope: "row" }, k.id),
      el("td", {}, k.user ?? ""),
      el("td", {}, k.team ?? ""),
      el("td", {}, budgetText(k)),
      el("td", {}, spent != null ? money(spent) : ""),
      el("td", {}, limitsText(k.limits)),
      el("td", {}, k.disabled ? "disabled" : "active"),
      actions));
  }
  section.dataset.loaded = "true";
};

async function change(path, body = "{}", method = "POST") {
  try {
    await api(path, { method, body });
    await loaders.keys();
    say("Saved.");
  } catch (e) {
    say(e.message);
  }
}

function numberOrNull(v) {
  return v === "" ? null : Number(v);
}

$("#key-create").addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = {};
  const v = (id) => $(id).value.trim();
  if (v("#new-key-id")) input.id = v("#new-key-id");
  if (v("#new-key-user")) input.user = v("#new-key-user");
  if (v("#new-key-team")) input.team = v("#new-key-team");
  if (v("#new-key-budget")) input.budget = { usd: Number(v("#new-key-budget")), period: $("#new-key-period").value };
  if (v("#new-key-rpm")) input.limits = { rpm: Number(v("#new-key-rpm")) };
  try {
    const created = await api("/admin/keys", { method: "POST", body: JSON.stringify(input) });
    e.target.reset();
    showSecret(created.secret);
    await loaders.keys();
  } catch (err) {
    say(err.message);
  }
});

function editKey(k) {
  const dialog = $("#edit-dialog");
  $("#edit-title").textContent = `Edit ${k.id}`;
  $("#edit-budget").value = k.budget ? k.budget.usd : "";
  $("#edit-period").value = k.budget ? k.budget.period : "monthly";
  $("#edit-rpm").value = k.limits?.rpm ?? "";
  $("#edit-concurrency").value = k.limits?.concurrency ?? "";
  dialog.onclose = () => {
    if (dialog.returnValue !== "save") return;
    const budget = $("#edit-budget").value === "" ? null : { usd: Number($("#edit-budget").value), period: $("#edit-period").value };
    const rpm = numberOrNull($("#edit-rpm").value), concurrency = numberOrNull($("#edit-concurrency").value);
    const limits = rpm == null && concurrency == null ? null : { ...(k.limits || {}), rpm, concurrency };
    change(`/admin/keys/${encodeURIComponent(k.id)}`, JSON.stringify({ budget, limits }), "PATCH");
  };
  dialog.showModal();
}

// ---- Providers ----

loaders.providers = async function loadProviders() {
  const section = $("#providers");
  section.dataset.loaded = "false";
  const [status, overview] = await Promise.all([api("/status"), api("/admin/overview")]);
  const body = $("#endpoint-table tbody");
  body.replaceChildren();
  for (const p of status.providers) {
    for (const e of p.endpoints) {
      body.append(el("tr", { "data-provider": p.provider, "data-endpoint": e.endpoint },
        el("th", { scope: "row" }, p.provider),
        el("td", {}, e.endpoint),
        el("td", { class: "in-rotation" }, e.in_rotation ? "yes" : "no"),
        el("td", {}, e.in_flight),
        el("td", {}, e.consecutive_failures),
        el("td", {}, e.cooldowns),
        el("td", {}, p.problem ?? "")));
    }
  }
  const list = (id, series, label) => {
    const ul = $(id);
    ul.replaceChildren(...series.map((s) => el("li", { "data-count": s.value }, `${label(s.labels)}: ${fmtInt(s.value)}`)));
    if (!series.length) ul.append(el("li", {}, "None."));
  };
  list("#upstream-errors", overview.counters.tollgate_upstream_errors_total || [], (l) => `${l.provider} ${l.kind}`);
  list("#fallbacks", overview.counters.tollgate_fallbacks_total || [], (l) => l.model);
  section.dataset.loaded = "true";
};

show("spend", false);
