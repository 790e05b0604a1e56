// Hyperfleet dashboard: plain JavaScript, no dependencies. The API key lives in sessionStorage and goes in
// the Authorization header only; the event stream is read with fetch() (EventSource cannot send headers),
// so no secret ever appears in a URL.
"use strict";

const KEY = "hyperfleet.key";
const state = { machines: new Map(), config: null, lastEventId: null, stream: null, page: null };

const $ = (id) => document.getElementById(id);
const key = () => sessionStorage.getItem(KEY);

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + key() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (resp.status === 401) { signOut(); throw new Error("the key was refused"); }
  if (resp.status === 204) return null;
  const data = await resp.json().catch(() => null);
  if (!resp.ok) throw new Error(data && data.error ? data.error.code + ": " + data.error.message : resp.statusText);
  return data;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

// ---- events: fetch()-based Server-Sent Events reader, resuming with Last-Event-ID ----

async function followEvents() {
  if (state.stream) return;
  const ctl = new AbortController();
  state.stream = ctl;
  while (state.stream === ctl && key()) {
    try {
      const headers = { Authorization: "Bearer " + key(), Accept: "text/event-stream" };
      if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
      const resp = await fetch("/events", { headers, signal: ctl.signal });
      if (!resp.ok) throw new Error("events: " + resp.status);
      setLive(true);
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const ev = { id: null, data: "" };
          for (const line of block.split("\n")) {
            if (line.startsWith("id:")) ev.id = line.slice(3).trim();
            else if (line.startsWith("data:")) ev.data += line.slice(5).replace(/^ /, "");
          }
          if (ev.id) state.lastEventId = ev.id;
          if (ev.data) { try { onEvent(JSON.parse(ev.data)); } catch (_) { /* keep-alive or error text */ } }
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    setLive(false);
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function stopEvents() {
  if (state.stream) state.stream.abort();
  state.stream = null;
  setLive(false);
}

function setLive(on) {
  const l = $("live");
  l.textContent = on ? "live" : "offline";
  l.className = "live " + (on ? "on" : "off");
}

function onEvent(e) {
  const m = state.machines.get(e.machine_id);
  if (e.type === "deleted") {
    state.machines.delete(e.machine_id);
  } else if (e.type === "created" || !m) {
    refreshOne(e.machine_id);
  } else if (e.status) {
    m.status = e.status;
    if (e.type === "failed") m.error_message = e.reason;
  }
  if (state.page && state.page.id === e.machine_id) {
    if (e.status) showMachineStatus(state.machines.get(e.machine_id) || { status: e.status });
    if (e.type === "exec.finished" || e.type === "file.written") state.page.term.note(e);
  }
  renderList();
}

async function refreshOne(id) {
  try { state.machines.set(id, await api("GET", "/machines/" + encodeURIComponent(id))); renderList(); } catch (_) {}
}

// ---- machine list ----

async function loadList() {
  const all = [];
  for (let offset = 0; ; offset += 500) {
    const page = await api("GET", "/machines?limit=500&offset=" + offset);
    all.push(...page.machines);
    if (all.length >= page.total || page.machines.length === 0) break;
  }
  state.machines = new Map(all.map((m) => [m.id, m]));
  renderList();
}

function actionButtons(m, after) {
  const act = async (action) => {
    try {
      if (action === "delete") {
        if (!confirm("Delete " + m.name + "?")) return;
        await api("DELETE", "/machines/" + m.id + "?force=true");
        state.machines.delete(m.id);
        if (after) after(action);
      } else {
        state.machines.set(m.id, await api("POST", "/machines/" + m.id + "/" + action));
      }
      renderList();
    } catch (e) { ($("m-error").offsetParent ? $("m-error") : $("list-error")).textContent = e.message; }
  };
  const can = {
    start: ["pending", "stopped", "failed"], stop: ["running", "paused"], restart: ["running"],
    delete: ["pending", "stopped", "failed", "running", "paused"],
  };
  return Object.keys(can).map((a) => {
    const b = el("button", { "data-action": a, onclick: () => act(a) }, a);
    b.disabled = !can[a].includes(m.status);
    return b;
  });
}

function renderList() {
  const body = $("machines").tBodies[0];
  body.replaceChildren();
  for (const m of state.machines.values()) {
    const name = el("a", { href: "#/m/" + m.id, class: "machine-link" }, m.name);
    const status = el("span", { class: "status " + m.status }, m.status);
    if (m.error_message) status.title = m.error_message;
    body.append(el("tr", { "data-name": m.name, "data-id": m.id },
      el("td", {}, name), el("td", {}, status), el("td", {}, m.runtime), el("td", {}, m.guest_ip),
      el("td", {}, (m.created_at || "").replace("T", " ").slice(0, 19)),
      el("td", { class: "actions" }, ...actionButtons(m))));
  }
  if (state.page) {
    const m = state.machines.get(state.page.id);
    if (m) showMachineStatus(m);
  }
}

// ---- machine page ----

// The console is pluggable: anything with mount(el), note(event) and dispose() can replace ExecConsole
// (e.g. a terminal over the pty endpoint once it exists).
class ExecConsole {
  constructor(machineId) { this.id = machineId; this.history = []; }
  mount(root) {
    this.out = el("pre", { id: "exec-output" });
    this.input = el("input", { id: "exec-input", placeholder: "command, run with sh -c", autocomplete: "off" });
    const form = el("form", { id: "exec-form" }, this.input, el("button", { id: "exec-run", type: "submit" }, "Run"));
    form.addEventListener("submit", (ev) => { ev.preventDefault(); this.run(this.input.value); });
    root.replaceChildren(this.out, form);
  }
  print(text, cls) {
    const span = el("span", cls ? { class: cls } : {}, text);
    this.out.append(span);
    this.out.scrollTop = this.out.scrollHeight;
  }
  async run(cmd) {
    if (!cmd.trim()) return;
    this.input.value = "";
    this.print("$ " + cmd + "\n");
    try {
      const r = await api("POST", "/machines/" + this.id + "/exec", { command: ["sh", "-c", cmd], timeout: 60 });
      if (r.stdout) this.print(r.stdout);
      if (r.stderr) this.print(r.stderr, "stderr");
      this.print("[exit " + r.exit_code + ", " + r.duration_ms + " ms]\n");
    } catch (e) { this.print(e.message + "\n", "stderr"); }
  }
  note(_event) {}
  dispose() {}
}

class Chart {
  constructor(canvas, label, unit, max) { this.c = canvas; this.label = label; this.unit = unit; this.max = max; this.points = []; }
  push(v) { if (v == null) return; this.points.push(v); if (this.points.length > 60) this.points.shift(); this.draw(); }
  draw() {
    const g = this.c.getContext("2d"), w = this.c.width, h = this.c.height;
    g.clearRect(0, 0, w, h);
    const top = Math.max(this.max || 0, ...this.points, 1);
    g.strokeStyle = "#2a6fdb"; g.lineWidth = 2; g.beginPath();
    this.points.forEach((v, i) => {
      const x = (i / 59) * (w - 10) + 5, y = h - 5 - (v / top) * (h - 25);
      if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    });
    g.stroke();
    g.fillStyle = "#1d232a"; g.font = "12px system-ui";
    const last = this.points.length ? this.points[this.points.length - 1] : 0;
    g.fillText(this.label + ": " + last.toFixed(1) + " " + this.unit, 6, 14);
  }
}

function fmtBytes(n) {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}

function proxyLink(m, port) {
  const c = state.config || {};
  if (!c.proxy_port) return null;
  if (c.proxy_host_suffix) return location.protocol + "//" + m.name + "-" + port + c.proxy_host_suffix + ":" + c.proxy_port + "/";
  return location.protocol + "//" + location.hostname + ":" + c.proxy_port + c.proxy_prefix + "/" + m.name + "/" + port + "/";
}

function showMachineStatus(m) {
  const s = $("m-status");
  s.textContent = m.status;
  s.className = "status " + m.status;
  if (m.id) $("m-actions").replaceChildren(...actionButtons(m, () => { location.hash = "#/"; }));
}

async function openMachine(id) {
  closeMachine();
  const m = await api("GET", "/machines/" + encodeURIComponent(id));
  state.machines.set(m.id, m);
  const page = { id: m.id, timers: [], term: new ExecConsole(m.id), cpu: new Chart($("chart-cpu"), "CPU", "%", 100), mem: null };
  state.page = page;
  page.mem = new Chart($("chart-mem"), "memory", "MiB", (m.mem_size_mib || 0));
  $("m-name").textContent = m.name;
  $("m-error").textContent = "";
  showMachineStatus(m);
  const facts = [["id", m.id], ["runtime", m.runtime], ["vCPUs", m.vcpu_count], ["memory", m.mem_size_mib + " MiB"],
    ["interface", m.tap_device], ["host address", m.tap_ip], ["guest address", m.guest_ip], ["guest MAC", m.guest_mac],
    ["DNS", (m.network && m.network.dns || []).join(", ")], ["egress", JSON.stringify(m.network && m.network.egress)],
    ["created", m.created_at]];
  $("m-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v == null ? "" : v)]));
  const ports = (m.exposed_ports || []).map((p) => {
    const href = proxyLink(m, p);
    return el("li", {}, href ? el("a", { href, target: "_blank", rel: "noopener", class: "port-link" }, String(p)) : String(p));
  });
  $("m-ports").replaceChildren(...(ports.length ? ports : [el("li", {}, "none")]));
  page.term.mount($("terminal"));
  $("m-logs").textContent = "";
  const tick = async () => {
    if (state.page !== page) return;
    try {
      const s = await api("GET", "/machines/" + m.id + "/stats");
      page.cpu.push(s.cpu_percent);
      if (s.memory_used_bytes != null) page.mem.push(s.memory_used_bytes / 1048576);
      $("m-stats-text").textContent = "disk " + fmtBytes(s.disk_used_bytes) + " / " + fmtBytes(s.disk_size_bytes) +
        " · rx " + fmtBytes(s.network_rx_bytes) + " · tx " + fmtBytes(s.network_tx_bytes) +
        (s.uptime_seconds != null ? " · up " + Math.round(s.uptime_seconds) + " s" : "");
      if ($("follow").checked) {
        const logs = await api("GET", "/machines/" + m.id + "/logs?lines=200");
        const pre = $("m-logs");
        pre.textContent = logs.lines.join("\n");
        pre.scrollTop = pre.scrollHeight;
      }
    } catch (e) { $("m-error").textContent = e.message; }
  };
  tick();
  page.timers.push(setInterval(tick, 2000));
}

function closeMachine() {
  if (!state.page) return;
  state.page.timers.forEach(clearInterval);
  state.page.term.dispose();
  state.page = null;
}

// ---- navigation ----

function show(view) {
  for (const v of ["signin-view", "list-view", "machine-view"]) $(v).hidden = v !== view;
  $("signout").hidden = view === "signin-view";
}

async function route() {
  if (!key()) { closeMachine(); stopEvents(); show("signin-view"); return; }
  followEvents();
  const m = location.hash.match(/^#\/m\/([a-z0-9-]+)$/);
  try {
    if (m) { show("machine-view"); await openMachine(m[1]); }
    else { closeMachine(); show("list-view"); await loadList(); }
  } catch (e) { $(m ? "m-error" : "list-error").textContent = e.message; }
}

function signOut() {
  sessionStorage.removeItem(KEY);
  stopEvents();
  route();
}

window.addEventListener("DOMContentLoaded", async () => {
  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    try { await api("GET", "/machines?limit=1"); $("signin-error").textContent = ""; route(); }
    catch (e) { sessionStorage.removeItem(KEY); $("signin-error").textContent = e.message; show("signin-view"); }
  });
  $("signout").addEventListener("click", signOut);
  $("create-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const ports = $("create-ports").value.split(",").map((p) => p.trim()).filter(Boolean).map(Number);
    try {
      const m = await api("POST", "/machines", { name: $("create-name").value.trim(),
        vcpu_count: Number($("create-vcpus").value), mem_size_mib: Number($("create-mem").value), exposed_ports: ports });
      state.machines.set(m.id, m);
      $("create-name").value = "";
      $("list-error").textContent = "";
      renderList();
    } catch (e) { $("list-error").textContent = e.message; }
  });
  window.addEventListener("hashchange", route);
  try { state.config = await (await fetch("/ui/config.json")).json(); } catch (_) {}
  route();
});
