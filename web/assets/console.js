// console.js: the operator console. The admin token is typed in and kept in
// this script's memory only (never in the browser's storage or in a
// cookie): reloading the page forgets it. Create and edit sales, watch each
// sale's live counters, and see the reconcile report.
"use strict";

let adminToken = null; // in memory only

/** Stats refresh while a sale is upcoming or open (ms), and otherwise. */
const LIVE_EVERY = 1000;
const IDLE_EVERY = 5000;
/** Reconcile refresh (ms). */
const RECONCILE_EVERY = 15000;

const $ = (id) => document.getElementById(id);

function say(text, kind) {
  const box = $("message");
  box.textContent = text;
  box.className = kind || "";
}

function waitNotice(secs) {
  say("The gateway is busy; trying again in " + Math.ceil(secs) + " s…", "info");
}

function call(method, path, body) {
  return api(method, path, { token: adminToken, body, onWait: waitNotice });
}

function showSignedIn(on) {
  for (const id of ["form-section", "stats-section", "reconcile-section"]) $(id).hidden = !on;
  $("token-form").hidden = on;
  $("forget-token").hidden = !on;
  $("who").textContent = on
    ? "Signed in with the admin token (kept in this page's memory only)."
    : "Type the admin token to start. It stays in this page's memory only.";
}

async function onToken(event) {
  event.preventDefault();
  adminToken = $("admin-token").value;
  $("admin-token").value = "";
  try {
    await call("GET", "/admin/promotions");
    showSignedIn(true);
    say("Token accepted.", "ok");
    clearForm();
    refreshStats();
    reconcile();
  } catch (e) {
    adminToken = null;
    say(e.code === "unauthorized" ? "That admin token is not valid." : e.message, "error");
  }
}

// ---------------------------------------------------------------- form ---

function isoIn(minutes) {
  return new Date(Date.now() + minutes * 60000).toISOString().replace(/\.\d+Z$/, "Z");
}

function clearForm() {
  $("edit-id").value = "";
  $("p-name").value = "";
  $("p-stock").value = "100";
  $("p-limit").value = "1";
  $("p-price").value = "0";
  $("p-starts").value = isoIn(1);
  $("p-ends").value = isoIn(61);
  $("p-token").checked = false;
  $("p-captcha").checked = false;
  $("form-title").textContent = "New sale";
  $("save").textContent = "Create sale";
}

function formBody() {
  const int = (id) => Number.parseInt($(id).value, 10);
  return {
    name: $("p-name").value,
    stock: int("p-stock"),
    per_user_limit: int("p-limit"),
    price_cents: int("p-price"),
    starts_at: $("p-starts").value.trim(),
    ends_at: $("p-ends").value.trim(),
    require_token: $("p-token").checked || $("p-captcha").checked,
    require_captcha: $("p-captcha").checked,
  };
}

async function onSave(event) {
  event.preventDefault();
  const id = $("edit-id").value;
  try {
    const { body } = id
      ? await call("PUT", "/admin/promotions/" + id, formBody())
      : await call("POST", "/admin/promotions", formBody());
    say((id ? "Saved sale " : "Created sale ") + body.id + ": " + body.name + ".", "ok");
    clearForm();
    refreshStats();
  } catch (e) {
    // The server names the field at fault; the sentence says what to do.
    say(e.message + (e.serverMessage ? " (" + e.serverMessage + ")" : ""), "error");
  }
}

function edit(p) {
  $("edit-id").value = String(p.id);
  $("p-name").value = p.name;
  $("p-stock").value = String(p.stock);
  $("p-limit").value = String(p.per_user_limit);
  $("p-price").value = String(p.price_cents);
  $("p-starts").value = p.starts_at;
  $("p-ends").value = p.ends_at;
  $("p-token").checked = p.require_token;
  $("p-captcha").checked = p.require_captcha;
  $("form-title").textContent = "Edit sale " + p.id;
  $("save").textContent = "Save changes";
  $("p-name").focus();
}

// --------------------------------------------------------------- stats ---

let statsTimer = null;

async function refreshStats() {
  clearTimeout(statsTimer);
  if (!adminToken) return;
  let live = false;
  try {
    const { body } = await call("GET", "/admin/promotions");
    const rows = [];
    for (const p of body.promotions) {
      const { body: full } = await call("GET", "/admin/promotions/" + p.id);
      if (full.status === "active" || full.status === "upcoming") live = true;
      rows.push(full);
    }
    const tbody = $("stats").tBodies[0];
    tbody.replaceChildren(
      ...rows.map((p) => {
        const s = p.stats || {};
        const cell = (name, value) => el("td", { class: name, text: String(value) });
        return el(
          "tr",
          { id: "stats-" + p.id, "data-status": p.status },
          cell("id", p.id),
          cell("name", p.name),
          cell("status", p.status),
          cell("stock", p.stock),
          cell("remaining", s.remaining),
          cell("sold", s.sold),
          cell("persisted", s.persisted),
          cell("paid", s.paid),
          cell("cancelled", s.cancelled),
          cell("starts", p.starts_at),
          el(
            "td",
            {},
            el("button", {
              type: "button",
              id: "edit-" + p.id,
              "aria-label": "Edit sale " + p.id + " " + p.name,
              text: "Edit",
              disabled: p.status !== "upcoming",
              onclick: () => edit(p),
            })
          )
        );
      })
    );
  } catch (e) {
    say(e.message, "error");
  }
  $("every").textContent = live ? "second" : "5 seconds";
  statsTimer = setTimeout(refreshStats, live ? LIVE_EVERY : IDLE_EVERY);
}

// ----------------------------------------------------------- reconcile ---

let reconcileTimer = null;

async function reconcile() {
  clearTimeout(reconcileTimer);
  if (!adminToken) return;
  try {
    const { body } = await call("GET", "/admin/reconcile");
    const tbody = $("reconcile").tBodies[0];
    tbody.replaceChildren(
      ...body.promotions.map((r) =>
        el(
          "tr",
          { "data-drift": String(r.drift) },
          el("td", { text: String(r.promotion_id) }),
          el("td", { text: r.remaining === null ? "lost from Redis" : String(r.remaining) }),
          el("td", { text: String(r.sold) }),
          el("td", { text: String(r.returned) }),
          el("td", { text: String(r.unpersisted) }),
          el("td", { text: String(r.lost) }),
          el("td", { text: String(r.persisted) }),
          el("td", { text: String(r.drift) })
        )
      )
    );
    $("reconcile-status").textContent =
      (body.drift ? "Drift found: Redis and PostgreSQL disagree. " : "No drift: Redis and PostgreSQL agree. ") +
      "Checked at " + body.checked_at + ".";
    $("reconcile-status").className = body.drift ? "error" : "ok";
  } catch (e) {
    $("reconcile-status").textContent = e.message;
    $("reconcile-status").className = "error";
  }
  reconcileTimer = setTimeout(reconcile, RECONCILE_EVERY);
}

// ---------------------------------------------------------------- start ---

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", onToken);
  $("forget-token").addEventListener("click", () => {
    adminToken = null;
    clearTimeout(statsTimer);
    clearTimeout(reconcileTimer);
    showSignedIn(false);
    say("The token is forgotten.", "ok");
  });
  $("promotion-form").addEventListener("submit", onSave);
  $("clear").addEventListener("click", clearForm);
  $("reconcile-now").addEventListener("click", reconcile);
});
