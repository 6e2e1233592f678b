// The gateway's page: the registry (nodes, services, actions), a form to call an action and
// the cluster's live events. Everything it shows comes from the Sidecar API under the prefix
// the page's <meta name="nerve-prefix"> names; values are written as text, never as HTML.
"use strict";

(() => {
  const prefix = document.querySelector('meta[name="nerve-prefix"]').content;
  const api = (path) => new URL("." + prefix + path, document.baseURI).href;
  const byId = (id) => document.getElementById(id);
  const MAX_EVENTS = 200;
  const REFRESH_MS = 10000;
  const RETRY_MS = 2000;
  let actions = new Map();

  // Text of any value a peer sent (an object with a hostile toString included): never throws.
  function text(value) {
    if (value == null) return "";
    if (typeof value === "string") return value;
    if (typeof value === "number" || typeof value === "boolean") return String(value);
    try { return JSON.stringify(value); } catch (err) { return "?"; }
  }

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(text(child)));
    }
    return node;
  }

  const pretty = (value) => JSON.stringify(value, null, 2);

  function errorText(reply, body) {
    const error = body && (body.error || body);
    return error && error.message ? `${reply.status} ${error.name || ""}: ${error.message}` : `HTTP ${reply.status}`;
  }

  async function getJSON(path) {
    const reply = await fetch(api(path), { headers: { accept: "application/json" } });
    const body = await reply.json().catch(() => null);
    if (!reply.ok) throw new Error(errorText(reply, body));
    return body;
  }

  // --- registry ----------------------------------------------------------------------------

  function showNodes(nodes) {
    byId("nodes").replaceChildren(...nodes.map((n) => el("tr", { className: n.available ? "" : "down" },
      el("td", {}, el("code", {}, n.id), n.local ? " (this gateway)" : ""),
      el("td", {}, n.available ? "up" : "down"),
      el("td", {}, [n.hostname, ...(Array.isArray(n.ipList) ? n.ipList : [])].filter(Boolean).map(text).join(" ")),
      el("td", {}, n.client ? `${text(n.client.type)} ${text(n.client.version)}`.trim() : ""))));
  }

  function showServices(services) {
    byId("services").replaceChildren(...services.map((s) => el("li", {},
      el("code", {}, text(s.fullName || s.name)),
      s.version != null ? el("span", { className: "tag" }, `v${text(s.version)}`) : "",
      el("span", { className: "muted" }, ` on ${(Array.isArray(s.nodes) ? s.nodes : []).map(text).join(", ")}`))));
  }

  function showActions(list) {
    actions = new Map(list.map((a) => [a.name, a]));
    byId("action-names").replaceChildren(...list.map((a) => el("option", { value: a.name })));
    byId("actions").replaceChildren(...list.map((a) => {
      const pick = el("button", { type: "button", className: "link", title: "call it" }, a.name);
      pick.addEventListener("click", () => chooseAction(a.name));
      const nodes = (a.endpoints || []).map((e) => e.nodeID).join(", ");
      const typed = a.action && a.action.params ? el("span", { className: "tag" }, "params schema") : "";
      return el("li", {}, pick, typed, el("span", { className: "muted" }, ` on ${nodes}`));
    }));
  }

  async function refresh() {
    const status = byId("registry-status");
    try {
      const [nodes, services, list] = await Promise.all(
        ["/registry/nodes", "/registry/services", "/registry/actions"].map(getJSON));
      showNodes(nodes);
      showServices(services);
      showActions(list);
      status.textContent = `${nodes.length} nodes, ${services.length} services, ${list.length} actions ` +
        `(at ${new Date().toLocaleTimeString()})`;
      status.className = "";
      document.body.dataset.registry = "loaded";
    } catch (err) {
      status.textContent = `registry: ${err.message}`;
      status.className = "error";
    }
  }

  // --- calls -------------------------------------------------------------------------------

  function chooseAction(name) {
    byId("call-action").value = name;
    showSchema(name);
    byId("call-params").focus();
  }

  function showSchema(name) {
    const entry = actions.get(name);
    const params = entry && entry.action && entry.action.params;
    const box = byId("call-schema");
    box.hidden = !params;
    box.querySelector("pre").textContent = params ? pretty(params) : "";
  }

  function parseField(id, what) {
    const text = byId(id).value.trim();
    if (!text) return {};
    try {
      return JSON.parse(text);
    } catch (err) {
      throw new Error(`${what} is not JSON: ${err.message}`);
    }
  }

  async function call(event) {
    event.preventDefault();
    const status = byId("call-status");
    const answer = byId("call-answer");
    const name = byId("call-action").value.trim();
    answer.textContent = "";
    let body;
    try {
      body = { params: parseField("call-params", "params"), meta: parseField("call-meta", "meta") };
    } catch (err) {
      status.textContent = err.message;
      status.className = "error";
      return;
    }
    status.textContent = `calling ${name}…`;
    status.className = "";
    const started = performance.now();
    try {
      const reply = await fetch(api(`/call/${encodeURIComponent(name)}`), {
        method: "POST",
        headers: { "content-type": "application/json", accept: "application/json" },
        body: JSON.stringify(body),
      });
      const took = Math.round(performance.now() - started);
      const ctype = reply.headers.get("content-type") || "";
      const text = await reply.text();
      let shown = text;
      if (ctype.startsWith("application/json")) {
        try { shown = pretty(JSON.parse(text)); } catch (err) { shown = text; }
      }
      status.textContent = `${reply.status} ${reply.ok ? "OK" : "failed"} in ${took} ms`;
      status.className = reply.ok ? "ok" : "error";
      status.dataset.status = String(reply.status);
      answer.textContent = shown;
    } catch (err) {
      status.textContent = `${name}: ${err.message}`;
      status.className = "error";
    }
  }

  // --- live events -------------------------------------------------------------------------
  // Read with fetch, not EventSource: the gateway names each SSE event after the cluster's
  // event, and EventSource hands a named event only to a listener for that very name.

  let listening = null;

  function setEventsState(state, text) {
    const badge = byId("events-state");
    badge.dataset.state = state;
    badge.textContent = text || state;
  }

  function showEvent(type, data) {
    let item;
    try { item = JSON.parse(data); } catch (err) { item = { event: type, data }; }
    const list = byId("events");
    list.prepend(el("li", {},
      el("time", {}, new Date().toLocaleTimeString()), " ",
      el("code", { className: "event-name" }, item.event || type),
      el("span", { className: "muted" }, item.nodeID ? ` from ${item.nodeID}` : ""),
      el("pre", {}, pretty(item.data))));
    while (list.childElementCount > MAX_EVENTS) list.lastElementChild.remove();
  }

  // Server-Sent Events: blocks of "field: value" lines ended by a blank line.
  function parseBlock(block, dispatch) {
    let type = "message";
    const data = [];
    for (const line of block.split(/\r\n|\r|\n/)) {
      if (!line || line.startsWith(":")) continue;
      const at = line.indexOf(":");
      const field = at < 0 ? line : line.slice(0, at);
      const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
    }
    if (data.length) dispatch(type, data.join("\n"));
  }

  async function readEvents(pattern, control) {
    const reply = await fetch(api(`/events?${new URLSearchParams({ match: pattern })}`), {
      headers: { accept: "text/event-stream" }, signal: control.signal, cache: "no-store",
    });
    if (!reply.ok) {
      const body = await reply.json().catch(() => null);
      throw new Error(errorText(reply, body));
    }
    setEventsState("open", `listening to ${pattern}`);
    const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      pending += value;
      const blocks = pending.split(/\r\n\r\n|\n\n|\r\r/);
      pending = blocks.pop();
      for (const block of blocks) {
        parseBlock(block, (type, data) => {
          if (type === "overflow") setEventsState("overflow", "fell behind: reconnecting");
          else showEvent(type, data);
        });
      }
    }
  }

  async function listen(pattern) {
    if (listening) listening.abort();
    const control = new AbortController();
    listening = control;
    while (!control.signal.aborted) {
      setEventsState("connecting", "connecting…");
      try {
        await readEvents(pattern, control);
      } catch (err) {
        if (control.signal.aborted) return;
        setEventsState("error", `${err.message}: retrying`);
      }
      await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
    }
  }

  // --- wiring ------------------------------------------------------------------------------

  byId("refresh").addEventListener("click", refresh);
  byId("call-form").addEventListener("submit", call);
  byId("call-action").addEventListener("change", (e) => showSchema(e.target.value.trim()));
  byId("events-form").addEventListener("submit", (e) => {
    e.preventDefault();
    listen(byId("events-match").value.trim() || "**");
  });
  byId("events-clear").addEventListener("click", () => byId("events").replaceChildren());
  setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  refresh();
  listen(byId("events-match").value.trim() || "**");
})();
