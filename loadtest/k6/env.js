// loadtest/k6/env.js — reading the scripts' settings from the environment
// (`k6 run -e NAME=value`), shared by flash_sale.js and browse.js.

// NAME as a non-negative integer, `dflt` when unset or empty.
export function intEnv(name, dflt) {
  const raw = __ENV[name];
  if (raw === undefined || raw === '') return dflt;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 0) throw new Error(`${name} must be a non-negative integer, got ${raw}`);
  return n;
}

// NAME as a duration in seconds ("10s", "1500ms", "2m"), `dflt` when unset.
export function secondsEnv(name, dflt) {
  const raw = __ENV[name] || dflt;
  const m = /^(\d+(?:\.\d+)?)(ms|s|m)?$/.exec(raw);
  if (!m) throw new Error(`${name} must look like 10s, 1500ms or 2m, got ${raw}`);
  const v = Number(m[1]);
  return m[2] === 'ms' ? v / 1000 : m[2] === 'm' ? v * 60 : v;
}

// BASE_URL without a trailing slash.
export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/$/, '');
