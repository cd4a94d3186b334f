// loadtest/k6/browse.js — the crowd before (and during) a sale: read-only
// traffic on the public catalogue, which the gateway serves from its cache.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e PROMOTION_ID=7 loadtest/k6/browse.js
//
// Environment:
//   BASE_URL       the gateway                                  [http://127.0.0.1:8080]
//   PROMOTION_ID   a promotion to open; 0 or unset: each iteration opens one
//                  taken from the list it just read              [0]
//   RATE           page views per second at the peak (each view =
//                  GET /api/promotions, then GET /api/promotions/{id})  [500]
//   DURATION       ramp (a fifth of it) + peak                     [10s]
//   PRE_VUS, MAX_VUS                                                [50, 500]
//
// Thresholds (k6 exits 99 when one fails):
//   http_req_failed  rate<0.01   reads do not fail (any non-200 counts);
//   checks           rate>0.99   each answer has the expected shape: a
//                                `promotions` array, and the promotion asked for;
//   server_errors    count==0    no 5xx: the catalogue is served from the cache,
//                                so reads must never shed load.
// browse_list_latency and browse_item_latency are reported, not judged.

import http from 'k6/http';
import { check } from 'k6';
import { Counter, Trend } from 'k6/metrics';
import { BASE_URL, intEnv, secondsEnv } from './env.js';

const PROMOTION_ID = intEnv('PROMOTION_ID', 0);
const RATE = Math.max(1, intEnv('RATE', 500));
const DURATION_S = secondsEnv('DURATION', '10s');
const PRE_VUS = intEnv('PRE_VUS', 50);
const MAX_VUS = intEnv('MAX_VUS', 500);

const listLatency = new Trend('browse_list_latency', true);
const itemLatency = new Trend('browse_item_latency', true);
const serverErrors = new Counter('server_errors');

export const options = {
  scenarios: {
    browse: {
      executor: 'ramping-arrival-rate',
      startRate: 1,
      timeUnit: '1s',
      preAllocatedVUs: PRE_VUS,
      maxVUs: Math.max(PRE_VUS, MAX_VUS),
      stages: [
        { target: RATE, duration: `${Math.max(1, Math.round(DURATION_S * 200))}ms` },
        { target: RATE, duration: `${Math.max(1, Math.round(DURATION_S * 800))}ms` },
      ],
    },
  },
  thresholds: {
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.99'],
    server_errors: ['count==0'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export function setup() {
  serverErrors.add(0);
}

function counted(res) {
  if (res.status >= 500) serverErrors.add(1, { status: String(res.status) });
  return res;
}

export default function () {
  const list = counted(http.get(`${BASE_URL}/api/promotions`, { tags: { name: 'list' } }));
  listLatency.add(list.timings.duration);
  let promotions = [];
  try {
    promotions = list.json('promotions') || [];
  } catch (_) {
    promotions = null;
  }
  check(list, {
    'list: 200': (r) => r.status === 200,
    'list: a promotions array': () => Array.isArray(promotions),
  });

  let id = PROMOTION_ID;
  if (!id && Array.isArray(promotions) && promotions.length > 0) {
    id = promotions[Math.floor(Math.random() * promotions.length)].id;
  }
  if (!id) return;
  const item = counted(http.get(`${BASE_URL}/api/promotions/${id}`, { tags: { name: 'item' } }));
  itemLatency.add(item.timings.duration);
  check(item, {
    'item: 200': (r) => r.status === 200,
    'item: the promotion asked for': (r) => r.status === 200 && r.json('id') === id,
  });
}
