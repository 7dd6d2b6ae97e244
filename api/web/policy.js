// The policy editor (operators only): the policy in force and its history, an editor that
// validates as you type, the diff and a preview on stored rows, apply, and the audit log.
// It uses the same /v1/policies API as `mailmeta policy …`. Loaded after app.js, whose helpers
// ($, el, call, failure) it shares; values are only ever set as textContent.
"use strict";

const pol = { customer: null, version: null, typed: 0, timer: null, valid: null };
const TYPE_DELAY_MS = 300;
// After a change, the applied line is refreshed this often until every live worker settles.
const APPLIED_POLL_MS = 1000;
const APPLIED_POLLS = 30;
const SETTLED = ["applied", "refused", "different_digest", "missing"];

function rule(v) {
  if (v === undefined || v === null) return "—";
  return typeof v === "object" ? JSON.stringify(v) : String(v);
}

function rowsOf(tableId) {
  const tb = $(tableId).tBodies[0];
  tb.replaceChildren();
  return tb;
}

function addRow(tb, cells, cls) {
  const tr = el("tr", null, cls);
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  tb.appendChild(tr);
  return tr;
}

function policyError(message) { $("p-error").textContent = message || ""; }

async function loadPolicy(customerId) {
  pol.customer = customerId;
  policyError("");
  $("p-result").textContent = "";
  const [shown, audit] = await Promise.all([
    call("GET", "/v1/policies/" + encodeURIComponent(customerId)),
    call("GET", "/v1/policies/" + encodeURIComponent(customerId) + "/audit", { limit: 50 }),
  ]).catch((e) => { if (e.message !== "unauthorized") policyError(e.message); return [null, null]; });
  if (!shown) return;
  if (!shown.ok) { policyError(failure(shown)); return; }
  showPolicy(shown.body);
  if (audit.ok) showAudit(audit.body.audit); else policyError(failure(audit));
  $("p-editor").value = JSON.stringify(shown.body.policy, null, 2);
  validateSoon(0);
}

function showPolicy(p) {
  pol.version = p.version;
  $("p-customer").textContent = p.customer_id;
  $("p-version").textContent = "version " + p.version + " (" + p.source + ", " + p.actor + ")";
  $("p-stale").hidden = !p.config_is_stale;
  $("p-current").textContent = JSON.stringify(p.policy, null, 2);
  showApplied(p.applied);
  $("p-apply").textContent = "Apply as version " + (p.version + 1);
  const ol = $("p-history"); ol.replaceChildren();
  for (const h of [...p.history].reverse()) {
    const li = el("li", "v" + h.version + " · " + h.at.replace("T", " ").replace("Z", " UTC") + " · " + h.actor + " (" + h.source + ")");
    li.dataset.version = h.version;
    const changes = el("pre", JSON.stringify(h.policy, null, 2), "policy-doc");
    li.appendChild(changes);
    ol.appendChild(li);
  }
}

// "published vN, applied by k of n workers", and each worker that does not apply it and why.
function showApplied(a) {
  const ul = $("p-workers"); ul.replaceChildren();
  if (!a || a.error) { $("p-applied").textContent = a ? a.error : ""; return false; }
  $("p-applied").textContent = "Published v" + a.version + ", applied by " + a.applied_by + " of " +
    a.workers + " redaction worker" + (a.workers === 1 ? "" : "s") + " (heard within " + a.stale_after_s + " s).";
  for (const w of a.by_worker) {
    if (w.state === "applied") continue;
    const held = w.version === null ? "holds no version" : "holds v" + w.version;
    const li = el("li", w.worker + ": " + w.state.replace("_", " ") + " (" + held + ")" + (w.reason ? ": " + w.reason : ""));
    li.dataset.state = w.state;
    ul.appendChild(li);
  }
  return a.by_worker.every((w) => SETTLED.includes(w.state));
}

async function followApplied(customerId, tries) {
  if (pol.customer !== customerId || tries <= 0) return;
  const r = await call("GET", "/v1/policies/" + encodeURIComponent(customerId));
  if (!r.ok || pol.customer !== customerId) return;
  if (!showApplied(r.body.applied)) setTimeout(() => followApplied(customerId, tries - 1).catch(() => {}), APPLIED_POLL_MS);
}

function showAudit(rows) {
  const tb = rowsOf("p-audit");
  for (const a of rows) {
    const tr = addRow(tb, [a.at.replace("T", " ").replace("Z", ""), a.actor, a.action, el("td", auditDetails(a), "details")]);
    tr.dataset.action = a.action;
  }
  if (!rows.length) addRow(tb, ["No policy changes recorded.", "", "", ""]);
}

function auditDetails(a) {
  const d = a.details || {};
  if (a.action === "policy.apply_to_stored") return "v" + d.version + ": " + d.rows_rewritten + " stored rows rewritten";
  const changed = Object.entries(d.diff || {}).map(([f, c]) => f + ": " + rule(c.old) + " → " + rule(c.new));
  return "v" + (d.old_version == null ? "–" : d.old_version) + " → v" + d.new_version + (changed.length ? " · " + changed.join("; ") : "");
}

// Validation as you type: the newest keystroke wins; older answers are ignored.
function validateSoon(delay) {
  clearTimeout(pol.timer);
  const seq = ++pol.typed;
  pol.valid = null;
  $("p-apply").disabled = true;
  pol.timer = setTimeout(() => validate(seq).catch((e) => { if (e.message !== "unauthorized") policyError(e.message); }), delay);
}

function setValidation(ok, message, problems) {
  const v = $("p-validation");
  v.textContent = message;
  v.className = ok ? "ok" : "error";
  const ul = $("p-problems"); ul.replaceChildren();
  for (const p of problems || []) ul.appendChild(el("li", p.field + ": " + p.problem));
}

function clearPreview() {
  rowsOf("p-diff"); rowsOf("p-preview");
  $("p-note").textContent = "";
}

async function validate(seq) {
  let doc;
  try { doc = JSON.parse($("p-editor").value); } catch (e) {
    clearPreview(); setValidation(false, "Not valid JSON: " + e.message); return;
  }
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
    clearPreview(); setValidation(false, "The policy must be a JSON object: field → action."); return;
  }
  const checked = await call("POST", "/v1/policies/validate", undefined, { policy: doc, customer: pol.customer });
  if (seq !== pol.typed) return;
  if (!checked.ok) {
    clearPreview();
    setValidation(false, checked.status === 422 ? "Invalid policy:" : failure(checked), checked.body && checked.body.problems);
    return;
  }
  const preview = await call("POST", "/v1/policies/" + encodeURIComponent(pol.customer) + "/preview", undefined, { policy: doc, sample: 5 });
  if (seq !== pol.typed) return;
  if (!preview.ok) { clearPreview(); setValidation(false, failure(preview), preview.body && preview.body.problems); return; }
  const changes = Object.keys(preview.body.diff).length;
  setValidation(true, changes ? "Valid: " + changes + " field(s) change." : "Valid, and the same as the policy in force.");
  showPreview(preview.body);
  pol.valid = doc;
  $("p-apply").disabled = changes === 0;
}

function showPreview(p) {
  const diff = rowsOf("p-diff");
  for (const [field, c] of Object.entries(p.diff)) {
    addRow(diff, [field, el("td", rule(c.old), "old"), el("td", rule(c.new), "new")]).dataset.field = field;
  }
  if (!Object.keys(p.diff).length) addRow(diff, ["No changes.", "", ""]);
  $("p-note").textContent = p.note;
  const tb = rowsOf("p-preview");
  for (const r of p.rows) {
    const head = addRow(tb, [], "sample");
    const th = el("th", r.received_at.replace("T", " ").replace("Z", " UTC") + " · stored under v" + r.stored_version + " · " + r.event_id);
    th.colSpan = 4; head.appendChild(th);
    for (const [field, f] of Object.entries(r.fields)) {
      const changed = JSON.stringify(f.before) !== JSON.stringify(f.after);
      const tr = addRow(tb, [field, rule(f.before), rule(f.after), el("td", f.change + (f.why ? " — " + f.why : ""), "why")], changed ? "changed" : "");
      tr.dataset.field = field;
    }
  }
  if (!p.rows.length) addRow(tb, ["No stored messages to preview.", "", "", ""]);
}

async function applyPolicy() {
  if (!pol.valid) return;
  $("p-apply").disabled = true;
  const body = { policy: pol.valid, apply_to_stored: $("p-apply-stored").checked, expected_version: pol.version };
  const r = await call("PUT", "/v1/policies/" + encodeURIComponent(pol.customer), undefined, body);
  if (!r.ok) {
    if (r.status === 422) setValidation(false, "Invalid policy:", r.body.problems);
    else policyError(failure(r) + (r.status === 409 ? " — reload the policy and edit again." : ""));
    $("p-apply").disabled = false;
    return;
  }
  const applied = r.body.applied_to_stored;
  const result = "Version " + r.body.version + " is in force" + (applied ? "; " + applied.rows_rewritten + " stored rows rewritten." : ".");
  // The policy in force changed: /v1/me describes it now. Stored rows may have been
  // rewritten: the message table shows them as they now are.
  state.me = await api("/v1/me");
  await Promise.all([loadPolicy(pol.customer), refresh()]);
  $("p-result").textContent = result;
  followApplied(pol.customer, APPLIED_POLLS).catch(() => {});
}

function setUpPolicyEditor() {
  $("p-editor").addEventListener("input", () => validateSoon(TYPE_DELAY_MS));
  $("p-apply").addEventListener("click", () => applyPolicy().catch((e) => { if (e.message !== "unauthorized") policyError(e.message); }));
  $("p-reset").addEventListener("click", () => loadPolicy(pol.customer));
}
