// common.js: what the sale page and the operator console share: calls to
// the API (JSON in and out, 429 and 503 retried after Retry-After, never
// hammered), the sentence a person reads for every error code of the API,
// and the server's clock.
"use strict";

// Every error code of the API (docs/openapi.json, ErrorCode), as a sentence
// a buyer or an operator understands. A unit test of the gateway holds this
// table against the document: a new code does not pass without its sentence.
const SENTENCES = {
  invalid_request: "Something in the form is not right. Check the fields and try again.",
  invalid_id: "That item does not exist. Reload the page and try again.",
  unauthorized: "Please log in first (your session may have expired).",
  not_found: "We could not find that. It may have been removed.",
  method_not_allowed: "The page asked for something the server does not do. Reload the page.",
  request_timeout: "The request took too long to arrive. Check your connection and try again.",
  payload_too_large: "What you sent is too large.",
  rate_limited: "Too many tries in a short time. Please wait a moment and try again.",
  sold_out: "Sorry, this sale is sold out.",
  already_purchased: "You have already bought as many of these as one buyer may.",
  not_started: "This sale has not started yet. Wait for the countdown to reach zero.",
  ended: "This sale has ended.",
  invalid_token: "Your admission to this sale expired or is not valid. Press Buy again.",
  invalid_captcha: "The characters you typed do not match the picture. Try the new picture.",
  order_cancelled: "This order was cancelled (or not paid in time), so it cannot be paid.",
  order_paid: "This order is already paid, so it cannot be cancelled.",
  order_pending: "This order is still being recorded. Try again in a few seconds.",
  promotion_started: "This sale has already started, so it can no longer be changed or deleted.",
  promotion_has_orders: "This sale has orders, so it cannot be deleted.",
  username_taken: "That username is already taken. Choose another one.",
  invalid_credentials: "The username or password is wrong.",
  unavailable: "The shop is very busy or briefly unavailable. We kept trying; please try again in a moment.",
  internal: "Something went wrong on our side. Please try again.",
  forbidden: "This is not allowed from where you are connecting.",
};

/** The sentence for an error code (a generic one for a code not listed). */
function sentence(code) {
  return SENTENCES[code] || "Something went wrong (" + code + "). Please try again.";
}

/** An answer of the API that is not a 2xx. */
class ApiError extends Error {
  constructor(status, code, message) {
    super(sentence(code));
    this.status = status;
    this.code = code;
    this.serverMessage = message;
  }
}

/** How many times a 429 or 503 is tried again before the error is shown. */
const MAX_RETRIES = 4;
/** The longest wait honoured from a Retry-After header, in seconds. */
const MAX_RETRY_AFTER = 10;

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Seconds to wait after a 429 or 503: its Retry-After (seconds or a date), at least 1. */
function retryAfterSeconds(res) {
  const value = res.headers.get("Retry-After");
  let secs = Number(value);
  if (value && !Number.isFinite(secs)) {
    const at = Date.parse(value);
    secs = Number.isFinite(at) ? (at - Date.now()) / 1000 : 1;
  }
  if (!Number.isFinite(secs) || secs < 1) secs = 1;
  return Math.min(secs, MAX_RETRY_AFTER);
}

/**
 * Calls the API and returns {status, body, res}. A 429 or 503 is tried again
 * after its Retry-After, at most MAX_RETRIES times; `onWait(seconds)` is told
 * of each wait. Any other non-2xx throws an ApiError.
 */
async function api(method, path, { token, body, onWait } = {}) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  for (let attempt = 0; ; attempt++) {
    let res;
    try {
      res = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
      });
    } catch (e) {
      throw new ApiError(0, "unavailable", String(e));
    }
    if ((res.status === 429 || res.status === 503) && attempt < MAX_RETRIES) {
      const secs = retryAfterSeconds(res);
      if (onWait) onWait(secs);
      await sleep(secs * 1000);
      continue;
    }
    let data = null;
    const text = await res.text();
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (e) {
        data = null;
      }
    }
    if (res.ok || res.status === 304) return { status: res.status, body: data, res };
    const err = data && data.error ? data.error : {};
    throw new ApiError(res.status, err.code || (res.status >= 500 ? "unavailable" : "invalid_request"), err.message);
  }
}

/**
 * The server's clock: the offset from this browser's clock to the gateway's
 * (Redis's time, which decides when a sale opens), learnt from the
 * X-Server-Time header (Unix milliseconds) against the middle of the round
 * trip; the sample with the shortest round trip wins.
 */
const serverClock = {
  offset: 0,
  bestRtt: Infinity,
  synced: false,
  learn(sentAt, receivedAt, res) {
    const value = Number(res.headers.get("X-Server-Time"));
    if (!Number.isFinite(value) || value <= 0) return;
    const rtt = receivedAt - sentAt;
    // A sample much older than the best is replaced: clocks drift.
    if (rtt <= this.bestRtt || !this.synced) {
      this.bestRtt = rtt;
      this.offset = value - (sentAt + receivedAt) / 2;
      this.synced = true;
    }
  },
  now() {
    return Date.now() + this.offset;
  },
};

/** "1 h 02 min 03 s", "4 min 05 s", "7 s" for a duration in milliseconds. */
function formatDuration(ms) {
  let s = Math.max(0, Math.ceil(ms / 1000));
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  const pad = (n) => String(n).padStart(2, "0");
  if (h > 0) return h + " h " + pad(m) + " min " + pad(s) + " s";
  if (m > 0) return m + " min " + pad(s) + " s";
  return s + " s";
}

/** "999.00" for 99900 cents. */
function formatPrice(cents) {
  return (cents / 100).toFixed(2);
}

/** An element with attributes and children (text or elements). */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v === null || v === undefined) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}
