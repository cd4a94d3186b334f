// sale.js: the sale page. Log in or register, see the sales with a
// countdown on the server's clock, pass the captcha and admission token
// step when a sale asks for it, buy, follow the order until it is
// confirmed, and pay or cancel it under "My orders".
"use strict";

const state = {
  token: null, // the buyer's JWT, in memory only
  username: null,
  promotions: new Map(), // id -> promotion (public fields)
  busy: new Set(), // promotion ids with a purchase in progress
  results: new Map(), // id -> sentence shown under the sale
};

/** How often the list of sales is fetched again (ms). */
const LIST_EVERY = 5000;
/** How often the clock is learnt again (ms). */
const CLOCK_EVERY = 30000;
/** How often a pending order's result is asked (ms), and for how long. */
const RESULT_EVERY = 1000;
const RESULT_FOR = 120000;

const $ = (id) => document.getElementById(id);

function say(text, kind) {
  const box = $("message");
  box.textContent = text;
  box.className = kind || "";
}

function waitNotice(secs) {
  say("The shop is busy; trying again in " + Math.ceil(secs) + " s…", "info");
}

// ------------------------------------------------------------- account ---

function credentials() {
  return { username: $("username").value.trim(), password: $("password").value };
}

function setLoggedIn(token, username) {
  state.token = token;
  state.username = username;
  $("who").textContent = token ? "Logged in as " + username + "." : "Not logged in.";
  $("login-form").hidden = !!token;
  $("logout").hidden = !token;
  renderPromotions();
  loadOrders();
}

async function login() {
  const c = credentials();
  const { body } = await api("POST", "/api/login", { body: c, onWait: waitNotice });
  setLoggedIn(body.token, c.username);
  say("Welcome, " + c.username + ".", "ok");
}

async function onLogin(event) {
  event.preventDefault();
  try {
    await login();
  } catch (e) {
    say(e.message, "error");
  }
}

async function onRegister() {
  try {
    await api("POST", "/api/register", { body: credentials(), onWait: waitNotice });
    await login();
    say("Your account is ready. Welcome, " + state.username + ".", "ok");
  } catch (e) {
    say(e.message, "error");
  }
}

// --------------------------------------------------------------- sales ---

async function syncClock() {
  const first = state.promotions.keys().next();
  const path = first.done ? "/api/promotions" : "/api/promotions/" + first.value;
  const sentAt = Date.now();
  try {
    const { res } = await api("GET", path);
    serverClock.learn(sentAt, Date.now(), res);
  } catch (e) {
    /* the next sync tries again */
  }
}

async function loadPromotions() {
  try {
    const sentAt = Date.now();
    const { body, res } = await api("GET", "/api/promotions", { onWait: waitNotice });
    if (!serverClock.synced) serverClock.learn(sentAt, Date.now(), res);
    const hadNone = state.promotions.size === 0;
    state.promotions = new Map(body.promotions.map((p) => [p.id, p]));
    if (hadNone && state.promotions.size > 0) await syncClock();
    renderPromotions();
  } catch (e) {
    say(e.message, "error");
  }
}

/** The phase of a sale on the server's clock: upcoming, open or ended. */
function phase(p, now) {
  if (now < Date.parse(p.starts_at)) return "upcoming";
  if (now >= Date.parse(p.ends_at)) return "ended";
  return "open";
}

/** Builds the card of a sale (once; later renders only update its text). */
function card(p) {
  const title = "promo-" + p.id + "-name";
  const item = el("li", { class: "card", id: "promo-" + p.id, "aria-labelledby": title });
  item.append(
    el("h3", { id: title }),
    el(
      "p",
      {},
      "Price ",
      el("strong", { class: "price" }),
      " · about ",
      el("span", { class: "remaining" }),
      " left · limit ",
      el("span", { class: "limit" }),
      " per buyer"
    ),
    el("p", { class: "countdown", id: "countdown-" + p.id })
  );
  if (p.require_captcha) {
    item.append(
      el(
        "div",
        { class: "captcha", id: "captcha-" + p.id, hidden: true },
        el("img", { id: "captcha-img-" + p.id, alt: "Picture of the characters to type" }),
        el("label", { for: "captcha-answer-" + p.id, text: "Characters in the picture" }),
        el("input", { id: "captcha-answer-" + p.id, autocomplete: "off" }),
        el("button", {
          type: "button",
          id: "captcha-new-" + p.id,
          text: "New picture",
          onclick: () => newCaptcha(p.id),
        })
      )
    );
  }
  item.append(
    el("button", { type: "button", class: "buy", id: "buy-" + p.id, text: "Buy", onclick: () => buy(p.id) }),
    el("p", { class: "result", id: "result-" + p.id, role: "status", "aria-live": "polite" })
  );
  return item;
}

function renderPromotions() {
  const list = $("promotions");
  for (const item of [...list.children]) {
    if (!state.promotions.has(Number(item.id.slice("promo-".length)))) item.remove();
  }
  $("no-promotions").hidden = state.promotions.size > 0;
  for (const p of state.promotions.values()) {
    let item = $("promo-" + p.id);
    if (!item) {
      item = card(p);
      list.append(item);
    }
    item.querySelector("h3").textContent = p.name;
    item.querySelector(".price").textContent = formatPrice(p.price_cents);
    item.querySelector(".remaining").textContent = String(p.remaining);
    item.querySelector(".limit").textContent = String(p.per_user_limit);
    $("buy-" + p.id).setAttribute("aria-label", "Buy " + p.name);
    const again = $("captcha-new-" + p.id);
    if (again) again.setAttribute("aria-label", "New picture for " + p.name);
  }
  tick();
}

/** Updates the countdowns and the Buy buttons from the server's clock. */
function tick() {
  const now = serverClock.now();
  $("clock").textContent = serverClock.synced
    ? "Server time: " + new Date(now).toISOString().replace(/\.\d+Z$/, "Z")
    : "Server time: not known yet.";
  for (const p of state.promotions.values()) {
    const countdown = $("countdown-" + p.id);
    const button = $("buy-" + p.id);
    if (!countdown || !button) continue;
    const ph = phase(p, now);
    let open = false;
    if (ph === "upcoming") {
      countdown.textContent = "Starts in " + formatDuration(Date.parse(p.starts_at) - now);
      countdown.dataset.phase = "upcoming";
    } else if (ph === "open") {
      open = p.status !== "sold_out";
      countdown.textContent = open
        ? "On sale now · ends in " + formatDuration(Date.parse(p.ends_at) - now)
        : "Sold out";
      countdown.dataset.phase = open ? "open" : "sold_out";
    } else {
      countdown.textContent = "Ended";
      countdown.dataset.phase = "ended";
    }
    const why = !state.token ? "Log in to buy" : !open ? "Not on sale now" : null;
    button.disabled = !open || !state.token || state.busy.has(p.id);
    button.title = why || "";
    const captcha = $("captcha-" + p.id);
    if (captcha) {
      const show = open && !!state.token;
      if (show && captcha.hidden) newCaptcha(p.id);
      captcha.hidden = !show;
    }
  }
}

function showResult(id, text) {
  state.results.set(id, text);
  const box = $("result-" + id);
  if (box) box.textContent = text;
}

const captchas = new Map(); // promotion id -> captcha_id

async function newCaptcha(id) {
  try {
    const { body } = await api("GET", "/api/promotions/" + id + "/captcha", {
      token: state.token,
      onWait: waitNotice,
    });
    captchas.set(id, body.captcha_id);
    const img = $("captcha-img-" + id);
    img.src = "data:image/png;base64," + body.image_png_base64;
    img.dataset.captchaId = body.captcha_id;
    $("captcha-answer-" + id).value = "";
  } catch (e) {
    showResult(id, e.message);
  }
}

/** The admission token a sale asks for (through its captcha when it has one). */
async function admission(p) {
  let body = {};
  if (p.require_captcha) {
    body = { captcha_id: captchas.get(p.id) || "", answer: $("captcha-answer-" + p.id).value.trim() };
  }
  const res = await api("POST", "/api/promotions/" + p.id + "/token", {
    token: state.token,
    body,
    onWait: waitNotice,
  });
  return res.body.token;
}

async function buy(id) {
  const p = state.promotions.get(id);
  if (!p || !state.token || state.busy.has(id)) return;
  state.busy.add(id);
  tick();
  showResult(id, "Buying…");
  try {
    const body = p.require_token ? { token: await admission(p) } : {};
    const res = await api("POST", "/api/promotions/" + id + "/purchase", {
      token: state.token,
      body,
      onWait: (secs) => showResult(id, "The shop is busy; trying again in " + Math.ceil(secs) + " s…"),
    });
    showResult(id, "Bought! Order " + res.body.order_id + " is being recorded…");
    await followResult(id);
  } catch (e) {
    showResult(id, e.message);
    if (e.code === "invalid_captcha" || e.code === "invalid_token") newCaptcha(id);
  } finally {
    state.busy.delete(id);
    tick();
  }
}

/** Asks for the purchase's result until it is confirmed (persisted). */
async function followResult(id) {
  const deadline = Date.now() + RESULT_FOR;
  while (Date.now() < deadline) {
    const { body } = await api("GET", "/api/promotions/" + id + "/result", {
      token: state.token,
      onWait: () => {},
    });
    if (body.status === "confirmed") {
      showResult(id, "Order " + body.order_id + " is confirmed. Pay for it under My orders.");
      await loadOrders();
      return;
    }
    await sleep(RESULT_EVERY);
  }
  showResult(id, "Your order is taking longer than usual to be recorded; it will appear under My orders.");
}

// -------------------------------------------------------------- orders ---

const STATUS_WORDS = { pending: "Waiting for payment", paid: "Paid", cancelled: "Cancelled" };

async function loadOrders() {
  const tbody = $("orders").tBodies[0];
  if (!state.token) {
    tbody.replaceChildren();
    $("no-orders").textContent = "Log in to see your orders.";
    $("no-orders").hidden = false;
    return;
  }
  try {
    const { body } = await api("GET", "/api/orders", { token: state.token, onWait: waitNotice });
    tbody.replaceChildren();
    for (const o of body.orders) {
      const name = state.promotions.has(o.promotion_id)
        ? state.promotions.get(o.promotion_id).name
        : "Sale " + o.promotion_id;
      const actions = el("td", {});
      if (o.status === "pending") {
        actions.append(
          el("button", {
            type: "button",
            class: "pay",
            id: "pay-" + o.order_id,
            "aria-label": "Pay order " + o.order_id,
            text: "Pay",
            onclick: () => orderAction(o.order_id, "pay"),
          }),
          " ",
          el("button", {
            type: "button",
            class: "cancel",
            id: "cancel-" + o.order_id,
            "aria-label": "Cancel order " + o.order_id,
            text: "Cancel",
            onclick: () => orderAction(o.order_id, "cancel"),
          })
        );
      }
      tbody.append(
        el(
          "tr",
          { id: "order-" + o.order_id, "data-status": o.status },
          el("td", { text: o.order_id }),
          el("td", { text: name }),
          el("td", { text: formatPrice(o.price_cents) }),
          el("td", { class: "status", text: STATUS_WORDS[o.status] || o.status }),
          actions
        )
      );
    }
    $("no-orders").textContent = "No orders yet.";
    $("no-orders").hidden = body.orders.length > 0;
  } catch (e) {
    say(e.message, "error");
  }
}

async function orderAction(orderId, action) {
  try {
    await api("POST", "/api/orders/" + encodeURIComponent(orderId) + "/" + action, {
      token: state.token,
      body: {},
      onWait: waitNotice,
    });
    say(action === "pay" ? "Thank you, order " + orderId + " is paid." : "Order " + orderId + " is cancelled.", "ok");
  } catch (e) {
    say(e.message, "error");
  }
  await loadOrders();
}

// ---------------------------------------------------------------- start ---

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", onLogin);
  $("register").addEventListener("click", onRegister);
  $("logout").addEventListener("click", () => {
    setLoggedIn(null, null);
    say("You are logged out.", "ok");
  });
  $("refresh-orders").addEventListener("click", loadOrders);
  loadPromotions();
  setInterval(loadPromotions, LIST_EVERY);
  setInterval(syncClock, CLOCK_EVERY);
  setInterval(tick, 250);
});
