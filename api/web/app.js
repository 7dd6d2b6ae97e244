// mailmeta dashboard: plain JS, no build step. Values from the API are only ever set as
// textContent (never HTML), so a subject line cannot inject markup.
"use strict";

const STATUSES = ["accepted", "delivered", "deferred", "bounced", "expired", "rejected"];
const COLORS = { accepted: "#1565c0", delivered: "#2e7d32", deferred: "#ef6c00", bounced: "#c62828", expired: "#795548", rejected: "#6a1b9a" };
const FIELDS = ["sender_ip", "helo", "mail_from", "rcpt_to", "message_id", "subject", "date", "size_bytes", "smtp_reply", "processing_ms", "tls_version"];
const ACTION_LABEL = { hmac: "HMAC-hashed", mask: "masked", truncate_ip: "IP truncated", drop: "dropped", keep: "" };
const $ = (id) => document.getElementById(id);
const state = { me: null, cursors: [], next: null };

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

// Every call goes through here: the token as a bearer, JSON in and out; a 401 signs out.
async function call(method, path, params, body) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params || {})) if (v !== "" && v != null) url.searchParams.set(k, v);
  const init = { method, headers: { Authorization: "Bearer " + sessionStorage.getItem("mailmeta-token") } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(url, init);
  let data = null;
  try { data = await r.json(); } catch (_) { /* not JSON */ }
  if (r.status === 401) { signOut("Your token is invalid or was revoked."); throw new Error("unauthorized"); }
  return { status: r.status, ok: r.ok, body: data };
}

function failure(r) { return (r.body && r.body.error) || ("HTTP " + r.status); }

async function api(path, params) {
  const r = await call("GET", path, params);
  if (!r.ok) throw new Error(failure(r));
  return r.body;
}

function signOut(message) {
  sessionStorage.removeItem("mailmeta-token");
  $("app").hidden = true; $("signout").hidden = true; $("signin").hidden = false; $("policy").hidden = true;
  $("who").textContent = ""; $("signin-error").textContent = message || "";
}

function isOperator() { return !!state.me && state.me.scopes.includes("admin") && !state.me.customer; }

function utc(local) { return local ? local + ":00Z" : ""; }

function customer() { return $("f-customer").value; }

function policy() {
  const c = state.me.customers.find((x) => x.id === customer());
  return c ? c.redaction : { policy_version: 0, actions: {} };
}

function filters() {
  return {
    customer: customer(), from: utc($("f-from").value), to: utc($("f-to").value),
    status: $("f-status").value, sender: $("f-sender").value.trim(), recipient: $("f-recipient").value.trim(),
    message_id: $("f-message-id").value.trim(), subject: $("f-subject").value.trim(),
  };
}

// A row keeps the form its policy version gave it: tag it by that version's actions (what
// the API sent with the page), the policy in force only when that version is unrecorded.
function cell(row, field, byVersion) {
  const stored = (byVersion || {})[row.policy_version];
  const action = (stored ? stored.actions : policy().actions)[field] || "drop";
  let v = row[field];
  if (Array.isArray(v)) v = v.join(", ");
  // A stored value is text from whoever sent the mail: <bdi> keeps its bidi controls
  // (U+202E...) from reordering the tag after it or anything around it.
  const td = el("td");
  td.appendChild(el("bdi", v == null ? "—" : v));
  if (action !== "keep") {
    td.classList.add("redacted");
    td.appendChild(el("span", ACTION_LABEL[action] || action, "tag"));
  }
  return td;
}

async function loadMessages(cursor) {
  $("error").textContent = "";
  const page = await api("/v1/messages", { ...filters(), cursor: cursor || "", limit: 25 });
  const tbody = $("messages").tBodies[0];
  tbody.replaceChildren();
  for (const m of page.messages) {
    const tr = el("tr", null, "row");
    tr.dataset.eventId = m.event_id;
    tr.appendChild(el("td", m.received_at.replace("T", " ").replace("Z", "")));
    const st = el("td"); st.appendChild(el("span", m.status, "status s-" + m.status)); tr.appendChild(st);
    const v = page.redaction_by_version;
    tr.appendChild(cell(m, "mail_from", v)); tr.appendChild(cell(m, "rcpt_to", v));
    tr.appendChild(cell(m, "subject", v)); tr.appendChild(cell(m, "message_id", v));
    tr.addEventListener("click", () => showDetail(m.event_id).catch(showError));
    tbody.appendChild(tr);
  }
  if (!page.messages.length) {
    const tr = el("tr"); const td = el("td", "No messages match."); td.colSpan = 6; tr.appendChild(td); tbody.appendChild(tr);
  }
  state.next = page.next;
  $("more").disabled = !page.next;
  $("first").disabled = state.cursors.length === 0;
  $("page-info").textContent = "page " + (state.cursors.length + 1) + " · " + page.messages.length + " shown";
}

async function loadChart() {
  const f = filters();
  const to = f.to || new Date().toISOString();
  const from = f.from || new Date(Date.parse(to) - 24 * 3600e3).toISOString();
  const stats = await api("/v1/stats", { customer: f.customer, from, to });
  drawChart(stats.hours || [], from, to);
  $("chart-range").textContent = from.slice(0, 16).replace("T", " ") + " – " + to.slice(0, 16).replace("T", " ") + " UTC";
}

function drawChart(hours, from, to) {
  const NS = "http://www.w3.org/2000/svg";
  const byHour = new Map();
  for (const h of hours) {
    const k = Date.parse(h.hour);
    if (!byHour.has(k)) byHour.set(k, {});
    byHour.get(k)[h.status] = (byHour.get(k)[h.status] || 0) + h.messages;
  }
  const start = Math.floor(Date.parse(from) / 3600e3) * 3600e3;
  const end = Date.parse(to);
  const slots = [];
  for (let t = start; t < end && slots.length < 24 * 31; t += 3600e3) slots.push(t);
  const max = Math.max(1, ...slots.map((t) => Object.values(byHour.get(t) || {}).reduce((a, b) => a + b, 0)));
  const W = 900, H = 200, L = 40, B = 20, bw = (W - L) / Math.max(1, slots.length);
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H + 20}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "messages per hour by status");
  const text = (x, y, s, anchor) => {
    const t = document.createElementNS(NS, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", "10");
    if (anchor) t.setAttribute("text-anchor", anchor);
    t.textContent = s; svg.appendChild(t);
  };
  const axis = document.createElementNS(NS, "line");
  axis.setAttribute("x1", L); axis.setAttribute("x2", W); axis.setAttribute("y1", H - B); axis.setAttribute("y2", H - B);
  axis.setAttribute("stroke", "#999"); svg.appendChild(axis);
  text(L - 4, 12, String(max), "end"); text(L - 4, H - B, "0", "end");
  let bars = 0;
  slots.forEach((t, i) => {
    let y = H - B;
    for (const s of STATUSES) {
      const n = (byHour.get(t) || {})[s] || 0;
      if (!n) continue;
      const h = (n / max) * (H - B - 10);
      const r = document.createElementNS(NS, "rect");
      r.setAttribute("x", L + i * bw + 1); r.setAttribute("width", Math.max(1, bw - 2));
      r.setAttribute("y", y - h); r.setAttribute("height", h); r.setAttribute("fill", COLORS[s]);
      r.setAttribute("class", "bar");
      const title = document.createElementNS(NS, "title");
      title.textContent = `${new Date(t).toISOString().slice(0, 13)}:00 ${s}: ${n}`;
      r.appendChild(title); svg.appendChild(r); y -= h; bars++;
    }
    if (i % Math.ceil(slots.length / 8) === 0) text(L + i * bw, H - 4, new Date(t).toISOString().slice(5, 13).replace("T", " ") + "h");
  });
  STATUSES.forEach((s, i) => {
    const r = document.createElementNS(NS, "rect");
    r.setAttribute("x", L + i * 110); r.setAttribute("y", H + 6); r.setAttribute("width", 10); r.setAttribute("height", 10);
    r.setAttribute("fill", COLORS[s]); svg.appendChild(r); text(L + i * 110 + 14, H + 15, s);
  });
  svg.dataset.bars = String(bars);
  $("chart").replaceChildren(svg);
}

async function showDetail(eventId) {
  const d = await api("/v1/messages/" + encodeURIComponent(eventId), { customer: customer() });
  const m = d.message, pol = d.redaction;
  $("detail").hidden = false;
  const note = "Stored under redaction policy version " + m.policy_version +
    (m.policy_version !== pol.policy_version ? " (current policy is version " + pol.policy_version + ")" : " (the current policy)") +
    ". Fields marked below were redacted by that policy.";
  $("detail-policy").textContent = note;
  const tb = $("detail-fields").tBodies[0];
  tb.replaceChildren();
  for (const f of ["event_id", "received_at", "status", ...FIELDS]) {
    const tr = el("tr"); tr.dataset.field = f;
    tr.appendChild(el("th", f));
    if (["event_id", "received_at", "status"].includes(f)) tr.appendChild(el("td", m[f]));
    else tr.appendChild(cell(m, f, d.stored_redaction ? { [m.policy_version]: d.stored_redaction } : null));
    tb.appendChild(tr);
  }
  const ol = $("history"); ol.replaceChildren();
  for (const h of d.history) {
    const li = el("li", h.received_at.replace("T", " ").replace("Z", " UTC") + " — ");
    li.appendChild(el("span", h.status, "status s-" + h.status));
    if (h.smtp_reply) { li.append(" "); li.appendChild(el("bdi", h.smtp_reply)); }
    ol.appendChild(li);
  }
  $("detail").scrollIntoView();
}

function showError(e) { if (e.message !== "unauthorized") $("error").textContent = e.message; }

async function refresh() {
  state.cursors = [];
  $("detail").hidden = true;
  await Promise.all([loadMessages(null), loadChart()]).catch(showError);
}

async function start() {
  try {
    state.me = await api("/v1/me");
  } catch (e) {
    if (e.message !== "unauthorized") $("signin-error").textContent = e.message;
    return;
  }
  $("signin").hidden = true; $("app").hidden = false; $("signout").hidden = false;
  // One region's API lists and answers for that region's customers only: say which region.
  const region = state.me.region && state.me.region !== "default" ? ", region " + state.me.region : "";
  $("who").textContent = "Signed in as " + state.me.name + (state.me.customer ? " (customer " + state.me.customer + region + ")" : " (operator" + region + ")");
  const sel = $("f-customer"); sel.replaceChildren();
  for (const c of state.me.customers) sel.appendChild(el("option", c.id));
  sel.disabled = state.me.customers.length < 2;
  // Policies are operators' business: only a token with the admin scope sees the editor.
  $("policy").hidden = !isOperator();
  await Promise.all([refresh(), isOperator() ? loadPolicy(customer()) : null]);
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("mailmeta-token", $("token").value.trim());
    $("token").value = "";
    start();
  });
  $("signout").addEventListener("click", () => signOut());
  $("filters").addEventListener("submit", (ev) => { ev.preventDefault(); refresh(); });
  $("f-customer").addEventListener("change", () => {
    refresh();
    if (isOperator()) loadPolicy(customer());
  });
  setUpPolicyEditor();
  $("more").addEventListener("click", () => {
    state.cursors.push(state.next);
    loadMessages(state.next).catch(showError);
  });
  $("first").addEventListener("click", () => { state.cursors = []; loadMessages(null).catch(showError); });
  $("close-detail").addEventListener("click", () => { $("detail").hidden = true; });
  if (sessionStorage.getItem("mailmeta-token")) start();
});
