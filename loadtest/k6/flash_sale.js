// loadtest/k6/flash_sale.js — the flash sale: a crowd of distinct buyers
// spikes on one promotion, then the counts are checked.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e PROMOTION_ID=7 -e STOCK=1000 \
//          -e USERS=5000 -e DURATION=5s -e JWT_SECRET=... -e ADMIN_TOKEN=... \
//          loadtest/k6/flash_sale.js
//
// Environment:
//   BASE_URL       the gateway                              [http://127.0.0.1:8080]
//   PROMOTION_ID   the promotion on sale (required)
//   STOCK          its stock: the number of 200s expected   [1000]
//   USERS          distinct buyers, one iteration each       [5000]
//   FIRST_USER     user id of the first buyer                [1]
//   DURATION       length of the spike (ramp + peak)         [5s]
//   RAMP           share of DURATION spent ramping up        [0.25]
//   JWT_SECRET     the gateway's SECKILL_JWT_SECRET (each VU signs its own JWTs)
//   ADMIN_TOKEN    the gateway's SECKILL_ADMIN_TOKEN (teardown reads the stats)
//   RECLICK        1: every buyer who got a 200 clicks "buy" again at once
//                  and must not get a second unit                [1]
//   PRE_VUS, MAX_VUS  VUs k6 keeps ready / may add             [100, 2000]
//   LOGIN          1: each buyer registers an account (POST /api/register,
//                  username k6-<RUN>-<index>) and logs in (POST /api/login)
//                  for the JWT it buys with, instead of signing its own; off
//                  by default so the purchase-only figures stay comparable.
//                  Each account costs the gateway an Argon2id hash to create
//                  and one to log in (tens of ms of one core each; past what
//                  the cores hash, logins are 503 by design): keep the rate
//                  modest, e.g. USERS=150 DURATION=10s        [0]
//   RUN            a name for this run's accounts (LOGIN=1)   [the start time]
//   LOG_ORDERS     1: log "ORDER <user> <order_id>" for each 200, so a script
//                  can check each one against PostgreSQL (k6 run
//                  --console-output=FILE)                       [0]
//
// The executor is ramping-arrival-rate: buyers arrive at a rate that ramps
// from 1/s to the peak over RAMP x DURATION and stays there; the peak is chosen
// so that USERS buyers arrive within DURATION. Each iteration is one buyer, with
// the user id FIRST_USER + its index in the test, so no two iterations share a
// user. Arrivals past USERS do nothing.
//
// What each threshold proves (any failed threshold makes k6 exit 99):
//   purchases_ok       count==STOCK  every unit was sold, and no more: with more
//                                    buyers than units, fewer 200s would be stock
//                                    left unsold or orders refused in error; more
//                                    would be an oversell seen by clients.
//   double_buys        count==0      no buyer got a second unit by clicking again
//                                    (the per-user limit held under the spike).
//   server_errors      count==0      no 5xx at all (a 500 is a bug; a 503 means
//                                    the gateway shed load or lost Redis).
//   transport_errors   count==0      no connection error or timeout.
//   unexpected_status  count==0      no status outside 200/409/410 (e.g. 401 for
//                                    a JWT this script signs, 429 rate limits).
//   http_req_failed    rate<0.01     the catch-all over every request, teardown's
//                                    included (expected: 200, 409, 410).
//   login_failures     count==0      LOGIN=1: every registration and login
//                                    succeeded.
//   stats_mismatch     count==0      teardown: the gateway's own count agrees,
//                                    sold == STOCK and remaining == 0 in Redis.
// purchase_latency (ms, every first click) has no threshold: speed is reported,
// correctness is what fails the run.

import http from 'k6/http';
import { check } from 'k6';
import crypto from 'k6/crypto';
import encoding from 'k6/encoding';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import { BASE_URL, intEnv, secondsEnv } from './env.js';

const PROMOTION_ID = intEnv('PROMOTION_ID', 0);
const STOCK = intEnv('STOCK', 1000);
const USERS = intEnv('USERS', 5000);
const FIRST_USER = intEnv('FIRST_USER', 1);
const DURATION_S = secondsEnv('DURATION', '5s');
const RAMP = Number(__ENV.RAMP || '0.25');
const JWT_SECRET = __ENV.JWT_SECRET || '';
const ADMIN_TOKEN = __ENV.ADMIN_TOKEN || '';
const RECLICK = (__ENV.RECLICK || '1') !== '0';
const LOG_ORDERS = (__ENV.LOG_ORDERS || '0') !== '0';
const LOGIN = (__ENV.LOGIN || '0') !== '0';
const RUN = __ENV.RUN || String(Date.now());
const PRE_VUS = intEnv('PRE_VUS', 100);
const MAX_VUS = intEnv('MAX_VUS', 2000);

if (!PROMOTION_ID) throw new Error('PROMOTION_ID is required');
if (!JWT_SECRET && !LOGIN) throw new Error('JWT_SECRET is required (the gateway\'s SECKILL_JWT_SECRET), or LOGIN=1');
if (USERS < 1) throw new Error('USERS must be at least 1');

// Arrivals = peak x (RAMP/2 + (1 - RAMP)) x DURATION; 3% spare so that all
// USERS arrive before the end (arrivals past USERS return at once).
const rampMs = Math.max(1, Math.round(DURATION_S * RAMP * 1000));
const peakMs = Math.max(1, Math.round(DURATION_S * (1 - RAMP) * 1000));
const PEAK = Math.max(1, Math.ceil((1.03 * USERS) / (DURATION_S * (1 - RAMP / 2))));

const purchasesOk = new Counter('purchases_ok');
const soldOut = new Counter('sold_out');
const alreadyPurchased = new Counter('already_purchased');
const doubleBuys = new Counter('double_buys');
const serverErrors = new Counter('server_errors');
const unavailable = new Counter('unavailable_503');
const transportErrors = new Counter('transport_errors');
const unexpectedStatus = new Counter('unexpected_status');
const buyers = new Counter('buyers');
const purchaseRequests = new Counter('purchase_requests');
const statsMismatch = new Counter('stats_mismatch');
const loginFailures = new Counter('login_failures');
const purchaseLatency = new Trend('purchase_latency', true);

export const options = {
  scenarios: {
    flash_sale: {
      executor: 'ramping-arrival-rate',
      exec: 'buy',
      startRate: 1,
      timeUnit: '1s',
      preAllocatedVUs: PRE_VUS,
      maxVUs: Math.max(PRE_VUS, MAX_VUS),
      stages: [
        { target: PEAK, duration: `${rampMs}ms` },
        { target: PEAK, duration: `${peakMs}ms` },
      ],
      gracefulStop: '30s',
    },
  },
  thresholds: {
    purchases_ok: [`count==${STOCK}`],
    double_buys: ['count==0'],
    server_errors: ['count==0'],
    transport_errors: ['count==0'],
    unexpected_status: ['count==0'],
    http_req_failed: ['rate<0.01'],
    stats_mismatch: ['count==0'],
    login_failures: ['count==0'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
  // Buyers are distinct people: no keep-alive sharing across VUs is assumed,
  // but each VU reuses its connection like a browser would.
  noConnectionReuse: false,
  setupTimeout: '60s',
  teardownTimeout: '60s',
};

// Statuses that are answers, not failures, for http_req_failed.
http.setResponseCallback(http.expectedStatuses(200, 201, 409, 410));

const JWT_HEADER = encoding.b64encode(JSON.stringify({ alg: 'HS256', typ: 'JWT' }), 'rawurl');

// An HS256 JWT for one user, valid one hour: {"sub": "<id>", "exp": now+3600}.
export function jwt(userId) {
  const claims = { sub: String(userId), exp: Math.floor(Date.now() / 1000) + 3600 };
  const signingInput = `${JWT_HEADER}.${encoding.b64encode(JSON.stringify(claims), 'rawurl')}`;
  return `${signingInput}.${crypto.hmac('sha256', JWT_SECRET, signingInput, 'base64rawurl')}`;
}

const PURCHASE_URL = `${BASE_URL}/api/promotions/${PROMOTION_ID}/purchase`;
const JSON_HEADERS = { 'Content-Type': 'application/json' };

// LOGIN=1: a buyer's account, registered and logged in: its JWT and user id,
// or null.
function login(index) {
  const body = JSON.stringify({ username: `k6-${RUN}-${index}`, password: `k6-password-${index}` });
  const reg = http.post(`${BASE_URL}/api/register`, body, { headers: JSON_HEADERS, tags: { name: 'register' } });
  if (reg.status !== 201 && reg.status !== 409) {
    loginFailures.add(1, { step: 'register', status: String(reg.status) });
    return null;
  }
  const res = http.post(`${BASE_URL}/api/login`, body, { headers: JSON_HEADERS, tags: { name: 'login' } });
  if (res.status !== 200) {
    loginFailures.add(1, { step: 'login', status: String(res.status) });
    return null;
  }
  return { token: res.json('token'), userId: res.json('user_id') };
}

function purchase(token, click) {
  const res = http.post(PURCHASE_URL, '{}', {
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    tags: { name: 'purchase', click },
    timeout: '30s',
  });
  purchaseRequests.add(1);
  if (res.status === 0) {
    transportErrors.add(1, { error: String(res.error_code) });
  } else if (res.status === 200) {
    purchasesOk.add(1);
  } else if (res.status === 409) {
    alreadyPurchased.add(1);
  } else if (res.status === 410) {
    soldOut.add(1);
  } else if (res.status >= 500) {
    serverErrors.add(1, { status: String(res.status) });
    if (res.status === 503) unavailable.add(1);
  } else {
    unexpectedStatus.add(1, { status: String(res.status) });
  }
  return res;
}

export function setup() {
  // Every counter gets a zero sample, so each threshold has data to judge.
  for (const c of [purchasesOk, soldOut, alreadyPurchased, doubleBuys, serverErrors, unavailable,
    transportErrors, unexpectedStatus, buyers, purchaseRequests, statsMismatch, loginFailures]) {
    c.add(0);
  }
  const res = http.get(`${BASE_URL}/api/promotions/${PROMOTION_ID}`);
  if (res.status !== 200) {
    throw new Error(`promotion ${PROMOTION_ID} is not on sale: ${res.status} ${res.body}`);
  }
  console.log(`flash sale: ${USERS} buyers for ${STOCK} units of promotion ${PROMOTION_ID}; ` +
    `arrival rate ramps to ${PEAK}/s over ${rampMs} ms, then ${peakMs} ms at the peak`);
  return {};
}

export function buy() {
  const index = exec.scenario.iterationInTest;
  if (index >= USERS) return;
  const account = LOGIN ? login(index) : { userId: FIRST_USER + index };
  if (!account) return;
  const userId = account.userId;
  const token = LOGIN ? account.token : jwt(userId);
  buyers.add(1);

  const res = purchase(token, 'first');
  purchaseLatency.add(res.timings.duration);
  if (res.status !== 200) return;

  let orderId = null;
  try {
    orderId = res.json('order_id');
  } catch (_) {
    // checked below
  }
  check(res, { 'a 200 carries an order_id and status pending': (r) => !!orderId && r.json('status') === 'pending' });
  if (LOG_ORDERS) console.log(`ORDER ${userId} ${orderId}`);

  if (RECLICK) {
    // The impatient buyer clicks again: 409 already_purchased (or 410 once
    // the gateway knows the promotion is sold out). Never a second 200.
    const again = purchase(token, 'again');
    if (again.status === 200) doubleBuys.add(1);
  }
}

export function teardown() {
  const res = http.get(`${BASE_URL}/admin/promotions/${PROMOTION_ID}`, {
    headers: { Authorization: `Bearer ${ADMIN_TOKEN}` },
  });
  if (res.status !== 200) {
    console.error(`teardown: GET /admin/promotions/${PROMOTION_ID} answered ${res.status}: ${res.body}`);
    statsMismatch.add(1);
    return;
  }
  const stats = res.json('stats');
  console.log(`teardown: admin stats ${JSON.stringify(stats)}`);
  const ok = check(stats, {
    'stats.sold == STOCK': (s) => s.sold === STOCK,
    'stats.remaining == 0': (s) => s.remaining === 0,
  });
  if (!ok) statsMismatch.add(1);
}
