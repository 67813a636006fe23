// llmux console: follows /llmux/v1/events and draws the page. Plain JavaScript, no framework.
// The stream is read with fetch (not EventSource) so that the API key can travel as a Bearer
// header; the key lives in this tab's sessionStorage only.
"use strict";

const EVENTS = "/llmux/v1/events";
const CONTROL = "/llmux/v1/control";
const ABOUT = "/llmux/v1/console";
const CHAT = "/v1/chat/completions";
const KEY_STORE = "llmux.console.key";
const LOG_LINES_SHOWN = 2000;
const REQUESTS_SHOWN = 300;
const SWITCHES_SHOWN = 50;
const EVICTIONS = ["", "offload+keep_running", "discard+keep_running", "retain+freeze", "offload+freeze",
  "retain+cuda_suspend", "retain+checkpoint", "discard+stop"];

const S = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  lastId: null,
  status: null,
  access: null,
  switches: [],
  running: {},
  requests: [],
  logs: [],
  abort: null,
  retry: 500,
  everConnected: false,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  if (S.key) h.Authorization = "Bearer " + S.key;
  return h;
}

function secs(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (v < 1) return Math.round(v * 1000) + " ms";
  return v.toFixed(v < 10 ? 2 : 1) + " s";
}

function clock(t) {
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

// -- connection --------------------------------------------------------------------------

function setConn(text, kind) {
  const c = $("conn");
  c.textContent = text;
  c.className = "pill pill-" + kind;
}

function notice(text, bad) {
  const n = $("notice");
  n.textContent = text || "";
  n.className = "banner" + (text ? "" : " banner-hidden") + (bad ? " banner-bad" : "");
}

async function follow() {
  if (S.abort) S.abort.abort();
  const abort = new AbortController();
  S.abort = abort;
  const headers = authHeaders({ Accept: "text/event-stream" });
  if (S.lastId) headers["Last-Event-ID"] = S.lastId;
  try {
    const resp = await fetch(EVENTS, { headers, signal: abort.signal, cache: "no-store" });
    if (resp.status === 401 || resp.status === 403) {
      const body = await resp.json().catch(() => ({}));
      setConn("key needed", "bad");
      notice("The event stream needs an API key: " + ((body.error && body.error.message) || resp.status), true);
      return; // no retry until a key is entered
    }
    if (!resp.ok || !resp.body) throw new Error("HTTP " + resp.status);
    setConn("live", "ok");
    S.retry = 500;
    await readStream(resp.body.getReader());
    throw new Error("the stream ended");
  } catch (err) {
    if (abort.signal.aborted && S.abort !== abort) return; // replaced by a newer connection
    setConn(S.everConnected ? "reconnecting…" : "cannot reach llmuxd, retrying…", "wait");
    setTimeout(follow, S.retry);
    S.retry = Math.min(S.retry * 2, 5000);
  }
}

async function readStream(reader) {
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
      dispatch(block);
    }
  }
}

function dispatch(block) {
  let type = "message", id = null;
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
    else if (field === "id") id = value;
  }
  if (!data.length) return;
  let payload;
  try { payload = JSON.parse(data.join("\n")); } catch (e) { return; }
  if (id) S.lastId = id;
  const handler = HANDLERS[type];
  if (handler) handler(payload);
}

const HANDLERS = {
  snapshot(d) {
    S.everConnected = true;
    S.access = d.access || null;
    S.switches = d.switches || [];
    S.running = {};
    for (const r of d.running || []) S.running[r.group] = r;
    S.requests = d.requests || [];
    S.logs = d.logs || [];
    const un = $("logs-unavailable");
    un.textContent = d.logs_unavailable ? "Logs unavailable: " + d.logs_unavailable : "";
    un.className = "empty" + (d.logs_unavailable ? "" : " banner-hidden");
    setStatus(d.status);
    drawAccess(); drawSwitches(); drawRequests(); drawLogs(true);
  },
  status(d) { setStatus(d); },
  state(d) {
    if (S.status && S.status.models && S.status.models[d.model]) {
      S.status.models[d.model].state = d.state;
      drawModels();
    }
  },
  mode(d) { if (S.status) { S.status.mode = d.mode; S.status.pinned = d.pinned; drawModels(); } },
  switch_started(d) { S.running[d.group] = d; drawSwitches(); },
  switch_finished(d) {
    delete S.running[d.group];
    S.switches.push(d);
    if (S.switches.length > SWITCHES_SHOWN) S.switches.shift();
    drawSwitches();
  },
  requests(list) {
    S.requests.push(...list);
    if (S.requests.length > REQUESTS_SHOWN) S.requests.splice(0, S.requests.length - REQUESTS_SHOWN);
    drawRequests();
  },
  log(d) {
    S.logs.push(d);
    if (S.logs.length > LOG_LINES_SHOWN) S.logs.shift();
    appendLog(d);
  },
  gap(d) {
    notice("Some events were lost (" + d.reason + (d.missed ? ", " + d.missed + " events" : "") +
      "); the page was redrawn from the current state.", false);
  },
  bye(d) { setConn("llmuxd is stopping; reconnecting…", "wait"); },
};

// -- drawing ------------------------------------------------------------------------------

function setStatus(st) {
  if (!st) return;
  if (st.error) { notice(st.error, true); return; }
  S.status = st;
  $("host-version").textContent = st.version ? "v" + st.version : "";
  drawModels();
}

function drawAccess() {
  const a = S.access;
  const banner = $("access");
  if (!a) { banner.textContent = ""; return; }
  banner.textContent = a.control ? "Controls enabled: " + a.why + "." : "Controls off — " + a.why;
}

function drawModels() {
  const st = S.status;
  if (!st) return;
  const mode = $("mode");
  mode.textContent = "mode: " + st.mode + (st.pinned ? " (pinned: " + st.pinned + ")" : "");
  const names = Object.keys(st.models || {});
  $("models-empty").textContent = names.length ? "" : "No models configured.";
  drawGroups(st);
  const body = $("models").tBodies[0];
  const focused = document.activeElement && document.activeElement.id;
  body.replaceChildren(...names.map((name) => modelRow(name, st.models[name], st)));
  if (focused && $(focused)) $(focused).focus();
  const sel = $("play-model");
  const chosen = sel.value;
  const current = Array.from(sel.options).map((o) => o.value).join("\n");
  if (current !== names.join("\n")) {
    sel.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
    if (names.includes(chosen)) sel.value = chosen;
  }
  const filter = $("log-filter");
  for (const n of names) {
    if (!Array.from(filter.options).some((o) => o.value === n)) filter.append(el("option", { value: n, text: n }));
  }
}

function drawGroups(st) {
  const box = $("groups");
  const parts = [];
  for (const [name, g] of Object.entries(st.groups || {})) {
    const budget = g.budget_gib;
    const bar = el("div", { class: "bar", role: "img",
      "aria-label": "group " + name + ": " + (budget ? (g.used_gib || 0) + " of " + budget + " GiB in use"
        : (g.awake && g.awake.length ? g.awake.join(", ") + " awake" : "nothing awake")) });
    for (const m of g.awake || []) {
      const mem = st.models[m] && st.models[m].gpu_memory_gib;
      const share = budget ? Math.min(1, (mem || budget) / budget) : 1 / Math.max(1, g.awake.length);
      const seg = el("span", { text: m + (mem ? " " + mem + " GiB" : ""), title: m });
      seg.style.width = (share * 100).toFixed(1) + "%";
      bar.append(seg);
    }
    parts.push(el("div", { class: "group" },
      el("div", { class: "group-name", text: "group " + name + " — " +
        (budget ? (g.used_gib || 0) + " / " + budget + " GiB" : "one model at a time") + " — " + (g.state || "") }),
      bar));
  }
  box.replaceChildren(...parts);
}

function modelRow(name, m, st) {
  const id = (s) => "ctl-" + s + "-" + name.replace(/[^A-Za-z0-9_-]/g, "_");
  const evSel = el("select", { id: id("ev"), "aria-label": "eviction for " + name });
  for (const e of EVICTIONS) evSel.append(el("option", { value: e, text: e || "(configured)" }));
  const controls = el("div", { class: "controls" },
    el("button", { type: "button", id: id("switch"), "aria-label": "switch to " + name,
      onclick: () => control({ action: "switch", model: name }) }, "Switch"),
    m.pinned
      ? el("button", { type: "button", id: id("unpin"), "aria-label": "unpin " + name,
        onclick: () => control({ action: "unpin", model: name }) }, "Unpin")
      : el("button", { type: "button", id: id("pin"), "aria-label": "pin " + name,
        onclick: () => control({ action: "pin", model: name }) }, "Pin"),
    el("button", { type: "button", id: id("sleep"), "aria-label": "sleep " + name,
      onclick: () => control({ action: "sleep", model: name }) }, "Sleep"),
    evSel,
    el("button", { type: "button", id: id("setev"), "aria-label": "set eviction of " + name,
      onclick: () => control({ action: "eviction", model: name, eviction: evSel.value }) }, "Set"));
  const cell = (label, value, cls) => el("td", { "data-label": label, class: cls }, value);
  return el("tr", { "data-model": name },
    cell("Model", el("strong", { text: name })),
    cell("State", el("span", { class: "state state-" + m.state, text: m.state })),
    cell("Process", m.process_state),
    cell("Eviction", m.eviction),
    cell("In flight", String(m.in_flight), "num"),
    cell("Queued", String(m.queue_depth), "num"),
    cell("Est. wait", m.queue_depth || m.state !== "active" ? secs(m.wait_estimate) : "–", "num"),
    cell("Pin", m.pinned ? "pinned" : (st.mode === "manual" ? "manual" : "auto")),
    cell("Last error", m.last_error || "–", m.last_error ? "err" : null),
    cell("Controls", controls));
}

function drawSwitches() {
  const list = $("switches");
  const items = [];
  for (const r of Object.values(S.running)) {
    items.push(el("li", { class: "running", "data-running": "1" },
      el("div", { class: "head" }, el("span", { text: clock(r.at) }),
        el("strong", { text: (r.from_model || "nothing") + " → " + (r.to_model || "sleep") }),
        el("span", { text: "in progress…" })),
      el("div", { class: "why", text: r.reason || "" })));
  }
  for (const s of S.switches.slice().reverse()) items.push(switchItem(s));
  list.replaceChildren(...items);
  $("switches-empty").textContent = items.length ? "" : "No switch yet.";
}

function switchItem(s) {
  const phases = Object.entries(s.phases || {});
  const total = phases.reduce((a, [, v]) => a + v, 0) || 1;
  const bar = el("div", { class: "phases", role: "img",
    "aria-label": phases.map(([k, v]) => k + " " + secs(v)).join(", ") || "no phases" });
  for (const [k, v] of phases) {
    const seg = el("span", { class: "ph-" + (["backoff", "cooldown", "drain", "sleep", "wake"].includes(k) ? k : "other"),
      title: k + " " + secs(v) });
    seg.style.width = (100 * v / total).toFixed(1) + "%";
    bar.append(seg);
  }
  const outcome = s.skipped ? "skipped" : s.ok ? "ok" : "failed";
  return el("li", { "data-to": s.to_model || "", "data-outcome": outcome },
    el("div", { class: "head" }, el("span", { text: clock(s.at) }),
      el("strong", { text: (s.from_model || "nothing") + " → " + (s.to_model || "sleep") }),
      el("span", { class: s.ok ? "" : "err", text: outcome + " in " + secs(s.duration) })),
    bar,
    el("div", { class: "phase-list", text: phases.map(([k, v]) => k + " " + secs(v)).join(" · ") }),
    el("div", { class: "why", text: (s.reason || "") + (s.error ? " — " + s.error : "") +
      (s.drain_timed_out ? " — drain timed out" : "") }));
}

function drawRequests() {
  const body = $("requests").tBodies[0];
  const rows = S.requests.slice(-REQUESTS_SHOWN).reverse().map((r) => el("tr", {},
    el("td", { text: clock(r.at) }), el("td", { text: r.model }), el("td", { text: r.key_id || "–" }),
    el("td", { class: r.status >= 400 ? "num err" : "num", text: String(r.status) }),
    el("td", { class: "num", text: secs(r.waited) }), el("td", { class: "num", text: secs(r.first_byte) }),
    el("td", { class: "num", text: secs(r.duration) }), el("td", { text: r.path })));
  body.replaceChildren(...rows);
  $("requests-empty").textContent = rows.length ? "" : "No request yet.";
}

function logShown(d) {
  const f = $("log-filter").value;
  if (f === "*") return true;
  if (f === "") return d.source === "llmuxd";
  return d.model === f;
}

function logNode(d) {
  const who = d.source === "backend" ? d.model : "llmuxd" + (d.model ? " (" + d.model + ")" : "");
  return el("span", { class: "log-" + d.source + " log-" + d.level },
    clock(d.at) + " " + who + ": " + d.text + "\n");
}

function drawLogs() {
  const box = $("logs");
  box.replaceChildren(...S.logs.filter(logShown).map(logNode));
  if ($("log-follow").checked) box.scrollTop = box.scrollHeight;
}

function appendLog(d) {
  if (!logShown(d)) return;
  const box = $("logs");
  box.append(logNode(d));
  while (box.childNodes.length > LOG_LINES_SHOWN) box.firstChild.remove();
  if ($("log-follow").checked) box.scrollTop = box.scrollHeight;
}

// -- actions ------------------------------------------------------------------------------

async function control(body) {
  notice((body.action === "eviction" ? "setting eviction of " : body.action + " ") + (body.model || "") + "…", false);
  try {
    const resp = await fetch(CONTROL, { method: "POST", headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(body) });
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) {
      notice("Refused: " + ((data.error && data.error.message) || "HTTP " + resp.status), true);
      return;
    }
    notice("Done: " + body.action + " " + (body.model || ""), false);
  } catch (err) {
    notice("Could not reach llmuxd: " + err.message, true);
  }
}

let playAbort = null;

async function play(ev) {
  ev.preventDefault();
  const out = $("play-out");
  const model = $("play-model").value;
  if (!model) { out.textContent = "No model to ask."; return; }
  out.textContent = "";
  out.dataset.done = "";
  playAbort = new AbortController();
  $("play-send").disabled = true;
  $("play-stop").disabled = false;
  try {
    const resp = await fetch(CHAT, { method: "POST", signal: playAbort.signal,
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model, stream: true, max_tokens: 64,
        messages: [{ role: "user", content: $("play-input").value }] }) });
    if (!resp.ok) {
      const data = await resp.json().catch(() => ({}));
      out.textContent = "Error " + resp.status + ": " + ((data.error && data.error.message) || resp.statusText);
      return;
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      const lines = buf.split("\n");
      buf = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const text = line.slice(5).trim();
        if (text === "[DONE]") continue;
        try {
          const chunk = JSON.parse(text);
          if (chunk.error) { out.textContent += "\n[error] " + (chunk.error.message || ""); continue; }
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) out.textContent += delta.content;
        } catch (e) { /* a partial line: the rest comes with the next chunk */ }
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") out.textContent += "\n[error] " + err.message;
  } finally {
    out.dataset.done = "1";
    $("play-send").disabled = false;
    $("play-stop").disabled = true;
  }
}

function init() {
  $("origin").textContent = location.origin;
  $("key-input").value = S.key ? "********" : "";
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = $("key-input").value.trim();
    if (v && v !== "********") { S.key = v; sessionStorage.setItem(KEY_STORE, v); }
    $("key-input").value = S.key ? "********" : "";
    notice(S.key ? "Key set for this tab." : "", false);
    S.lastId = null;
    follow();
  });
  $("key-forget").addEventListener("click", () => {
    S.key = ""; sessionStorage.removeItem(KEY_STORE); $("key-input").value = "";
    notice("Key forgotten.", false); S.lastId = null; follow();
  });
  $("play-form").addEventListener("submit", play);
  $("play-stop").addEventListener("click", () => playAbort && playAbort.abort());
  $("log-filter").addEventListener("change", () => drawLogs());
  start();
}

// With keys configured the stream needs one: ask for it first instead of failing with a 401.
async function start() {
  try {
    const resp = await fetch(ABOUT, { cache: "no-store" });
    const about = await resp.json();
    if (about.keys_configured && !S.key) {
      setConn("key needed", "bad");
      $("access").textContent = "This llmux requires an API key: enter one above (any key reads; " +
        "a key made with `llmuxctl keys add NAME --control` may also use the controls).";
      $("models-empty").textContent = "Enter an API key to see the models.";
      $("key-input").focus();
      return;
    }
  } catch (err) { /* the stream's own retries say what is wrong */ }
  follow();
}

document.addEventListener("DOMContentLoaded", init);
