// The spend console in a real browser: Debian's Chromium, headless, driven by playwright-core
// (both installed by scripts/console-deps.sh). tests/console.rs starts the gateway, sends the
// traffic, writes the ledger's own numbers to the EXPECT file and runs this script; it can also
// be run by hand against any gateway (docs/testing.md).
//
// Input, all from the environment:
//   TOLLGATE_CONSOLE_NODE_PATH  the node_modules holding playwright-core
//   TOLLGATE_CHROMIUM           the browser (/usr/bin/chromium)
//   CONSOLE_URL                 http://127.0.0.1:PORT/console (the admin listener)
//   ADMIN_TOKEN                 the gateway's admin token
//   GATEWAY_URL                 the proxy listener, where the key the console creates is used
//   EXPECT                      a JSON file of the ledger's numbers (see tests/console.rs)
//   SCREENSHOTS                 a folder for the screenshots (1366x768, one per tab and dialog)
//
// Prints `CONSOLE-OK {json}` last and exits 0, or `CONSOLE-FAIL [step] why` and exits 1 (with
// failure.png and failure.html in SCREENSHOTS).

import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const WAIT_MS = 10_000;
const CREATED_KEY = 'console-created';
const SESSION_COOKIE = 'tollgate_console';
const MESSAGES_BODY = JSON.stringify({ model: 'm', max_tokens: 100, messages: [{ role: 'user', content: 'hi' }] });

let step = 'setup';
class Failure extends Error {}

function fail(message) {
  throw new Failure(message);
}

function check(ok, message) {
  if (!ok) fail(typeof message === 'function' ? message() : message);
}

function env(name) {
  const v = process.env[name];
  if (!v) {
    console.log(`CONSOLE-FAIL [setup] ${name} is not set (scripts/console-deps.sh and tests/console.rs set it)`);
    process.exit(1);
  }
  return v;
}

const NODE_PATH = env('TOLLGATE_CONSOLE_NODE_PATH');
const CHROMIUM = env('TOLLGATE_CHROMIUM');
const CONSOLE_URL = env('CONSOLE_URL');
const ADMIN_TOKEN = env('ADMIN_TOKEN');
const GATEWAY_URL = env('GATEWAY_URL').replace(/\/$/, '');
const EXPECT = JSON.parse(readFileSync(env('EXPECT'), 'utf8'));
const SCREENSHOTS = env('SCREENSHOTS');
const ORIGIN = new URL(CONSOLE_URL).origin;

// ---------------------------------------------------------------------------------------------
// Money: decimal strings of USD compared exactly, as nano-dollars (the ledger's unit).

function nanos(s, what) {
  const m = /^(\d+)(?:\.(\d{1,9}))?$/.exec(String(s ?? '').trim());
  check(m, `${what}: ${JSON.stringify(s)} is not a decimal amount of USD with at most 9 decimals`);
  return BigInt(m[1]) * 1_000_000_000n + BigInt((m[2] ?? '').padEnd(9, '0'));
}

function usd(n) {
  const s = `${n / 1_000_000_000n}.${String(n % 1_000_000_000n).padStart(9, '0')}`;
  return s.replace(/0+$/, '').replace(/\.$/, '');
}

/**
 * `got` and `want` (name → USD string) hold the same names and amounts. A name at $0 may be on
 * either side or not (a group with only refused requests has a ledger row at $0, and a chart
 * has nothing to draw for it).
 */
function sameAmounts(got, want, what) {
  const names = (o) => Object.keys(o).filter((k) => nanos(o[k], `${what} ${k}`) !== 0n).sort();
  check(
    JSON.stringify(names(got)) === JSON.stringify(names(want)),
    () => `${what}: shows ${JSON.stringify(names(got))}, the ledger has ${JSON.stringify(names(want))}`,
  );
  for (const name of names(want)) {
    const [g, w] = [nanos(got[name], `${what} ${name}`), nanos(want[name], `expected ${what} ${name}`)];
    check(g === w, `${what} ${name}: the page shows $${usd(g)}, the ledger has $${usd(w)}`);
  }
}

// ---------------------------------------------------------------------------------------------
// The browser

const { chromium } = await import(pathToFileURL(join(NODE_PATH, 'playwright-core', 'index.mjs')).href);
mkdirSync(SCREENSHOTS, { recursive: true });

const args = ['--no-proxy-server', '--disable-gpu', '--disable-dev-shm-usage'];
// Chromium's sandbox refuses to start as root (CI runs as root).
if (process.getuid?.() === 0) args.push('--no-sandbox');
const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args, timeout: 30_000 });
const context = await browser.newContext({ viewport: { width: 1366, height: 768 } });
const page = await context.newPage();
page.setDefaultTimeout(WAIT_MS);
page.setDefaultNavigationTimeout(WAIT_MS);
// A confirm() before a change is answered yes.
page.on('dialog', (d) => d.accept());

// What went wrong in the page itself: uncaught errors, and admin calls the page made that failed
// (the test's own probes are made with `probing` set and are not counted).
const pageErrors = [];
const failedCalls = [];
const consoleErrors = [];
let probing = false;
page.on('pageerror', (e) => pageErrors.push(`${e.name}: ${e.message}`));
page.on('console', (m) => {
  if (m.type() === 'error') consoleErrors.push(m.text());
});
page.on('response', (r) => {
  const url = new URL(r.url());
  if (!probing && url.pathname.startsWith('/admin/') && r.status() >= 400) {
    failedCalls.push(`${r.request().method()} ${url.pathname}${url.search} -> ${r.status()}`);
  }
});
// The page's own changes: each must carry the session's CSRF token.
const changes = [];
page.on('request', (r) => {
  const url = new URL(r.url());
  if (!probing && url.pathname.startsWith('/admin/') && r.method() !== 'GET') {
    changes.push({ method: r.method(), path: url.pathname, csrf: r.headers()['x-csrf-token'] ?? null });
  }
});

function pageHealthy() {
  check(pageErrors.length === 0, () => `the page threw: ${pageErrors.join(' | ')}`);
  check(failedCalls.length === 0, () => `admin calls the page made failed: ${failedCalls.join(', ')}`);
}

const shots = [];
async function shot(name) {
  const file = join(SCREENSHOTS, `${name}.png`);
  await page.screenshot({ path: file });
  shots.push(file);
}

async function attr(selector, name) {
  const el = page.locator(selector);
  check((await el.count()) === 1, `${selector}: ${await el.count()} elements, expected exactly one`);
  return el.getAttribute(name);
}

/** Clicks a tab, waits for its section to be drawn and shown. */
async function openTab(name) {
  const tab = page.locator(`#tab-${name}`);
  check((await tab.count()) === 1, `no #tab-${name}`);
  check((await tab.getAttribute('role')) === 'tab', `#tab-${name} has no role="tab"`);
  check((await tab.evaluate((e) => e.tagName)) === 'BUTTON', `#tab-${name} is not a <button>`);
  await tab.click();
  await page.waitForSelector(`#${name}[data-loaded="true"]`, { state: 'attached' });
  await page.locator(`#${name}`).waitFor({ state: 'visible' });
  pageHealthy();
}

/** Redraws the spend section after `change` (a select), waiting for `drawn` to hold. */
async function redrawSpend(change, drawn, arg) {
  await page.evaluate(() => document.querySelector('#spend').removeAttribute('data-loaded'));
  await change();
  await page.waitForSelector('#spend[data-loaded="true"]', { state: 'attached' });
  await page.waitForFunction(drawn, arg, { timeout: WAIT_MS });
  pageHealthy();
}

/** The chart's bars. */
function bars() {
  return page.$$eval('#spend-chart rect.bar', (els) =>
    els.map((e) => ({
      day: e.getAttribute('data-day'),
      group: e.getAttribute('data-group'),
      usd: e.getAttribute('data-usd'),
      title: e.querySelector('title')?.textContent?.trim() ?? '',
    })),
  );
}

/** Checks the chart against the ledger's amounts per group (and per group and day). */
async function checkChart(byGroup, byGroupDay, what) {
  const all = await bars();
  check(all.length > 0, `${what}: the chart has no rect.bar`);
  const sums = {};
  const dayAmounts = {};
  for (const b of all) {
    check(/^\d{4}-\d{2}-\d{2}$/.test(b.day ?? ''), `${what}: a bar's data-day is ${JSON.stringify(b.day)}`);
    check(b.group, `${what}: a bar of ${b.day} has no data-group`);
    check(b.title, `${what}: the bar of ${b.day} ${b.group} has no <title>`);
    const n = nanos(b.usd, `${what}: bar ${b.day} ${b.group}`);
    if (n === 0n) continue;
    sums[b.group] = (sums[b.group] ?? 0n) + n;
    const k = `${b.group} ${b.day}`;
    check(dayAmounts[k] === undefined, `${what}: two bars for ${k}`);
    dayAmounts[k] = usd(n);
  }
  sameAmounts(Object.fromEntries(Object.entries(sums).map(([k, v]) => [k, usd(v)])), byGroup, `${what}: the bars' sum`);
  if (byGroupDay) sameAmounts(dayAmounts, byGroupDay, `${what}: the bars per day`);
  return all.length;
}

/** Checks the top spenders table against the ledger. */
async function checkTopSpenders(byGroup, requests, estimated, what) {
  const rows = await page.$$eval('#top-spenders tr[data-name]', (els) =>
    els.map((e) => ({
      name: e.getAttribute('data-name'),
      usd: e.getAttribute('data-usd'),
      requests: e.getAttribute('data-requests'),
      estimated: e.getAttribute('data-estimated'),
    })),
  );
  check(rows.length > 0, `${what}: #top-spenders has no tr[data-name]`);
  sameAmounts(Object.fromEntries(rows.map((r) => [r.name, r.usd])), byGroup, `${what}: top spenders`);
  for (const r of rows) {
    check(r.name in requests, `${what}: top spenders lists ${r.name}, which the ledger does not have`);
    check(
      Number(r.requests) === requests[r.name],
      `${what}: top spenders ${r.name}: ${r.requests} requests, the ledger has ${requests[r.name]}`,
    );
    if (estimated) {
      check(
        Number(r.estimated) === estimated[r.name],
        `${what}: top spenders ${r.name}: data-estimated ${r.estimated}, the ledger has ${estimated[r.name]}`,
      );
    }
  }
  // Most expensive first.
  for (let i = 1; i < rows.length; i++) {
    check(nanos(rows[i - 1].usd, 'top') >= nanos(rows[i].usd, 'top'), `${what}: top spenders are not sorted by cost`);
  }
}

/** A Messages request at the proxy with `secret`: its status. */
async function useKey(secret) {
  const r = await fetch(`${GATEWAY_URL}/v1/messages`, {
    method: 'POST',
    headers: { 'x-api-key': secret, 'content-type': 'application/json' },
    body: MESSAGES_BODY,
    signal: AbortSignal.timeout(WAIT_MS),
  });
  const text = await r.text();
  return { status: r.status, text };
}

/** An admin call from inside the page (same origin, the session cookie sent by the browser). */
async function fetchInPage(path, init) {
  probing = true;
  try {
    return await page.evaluate(
      async ([path, init]) => {
        const r = await fetch(path, init);
        return { status: r.status, text: await r.text() };
      },
      [path, init],
    );
  } finally {
    probing = false;
  }
}

async function sessionCookie() {
  return (await context.cookies(ORIGIN)).find((c) => c.name === SESSION_COOKIE);
}

// ---------------------------------------------------------------------------------------------
// The walk through

const summary = {};
try {
  step = 'login page';
  const loginResponses = [];
  page.on('response', (r) => {
    if (r.request().method() === 'POST' && new URL(r.url()).pathname === '/console/login') {
      loginResponses.push({ status: r.status(), location: r.headers()['location'] ?? null });
    }
  });
  const first = await page.goto(CONSOLE_URL);
  check(first.status() === 200, `GET ${CONSOLE_URL} without a session answered ${first.status()}`);
  await page.locator('form#login[method="post"][action="/console/login"]').waitFor();
  const byLabel = page.getByLabel('Admin token', { exact: true });
  check((await byLabel.count()) === 1, 'no field labelled "Admin token"');
  check((await byLabel.getAttribute('id')) === 'token', 'the field labelled "Admin token" is not #token');
  check((await byLabel.getAttribute('type')) === 'password', '#token is not type="password"');
  check((await byLabel.getAttribute('name')) === 'token', '#token is not name="token"');
  const submit = page.locator('form#login button:not([type]), form#login [type="submit"]');
  check((await submit.count()) >= 1, 'the login form has no submit button');
  check(!(await sessionCookie()), 'a session cookie before signing in');
  await shot('01-login');

  step = 'wrong token';
  const wrong = `${ADMIN_TOKEN}-wrong`;
  await page.locator('#token').fill(wrong);
  const [refused] = await Promise.all([page.waitForNavigation(), submit.first().click()]);
  check(refused.status() === 401, `a wrong token answered ${refused.status()}, not 401`);
  await page.locator('#login-error').waitFor({ state: 'visible' });
  const loginError = (await page.locator('#login-error').textContent()).trim();
  check(loginError.length > 0, '#login-error is empty');
  check(await page.locator('form#login #token').count(), 'the 401 page has no login form');
  check((await page.locator('#token').inputValue()) === '', 'the 401 page fills #token in');
  check(!(await page.content()).includes(wrong), 'the 401 page shows the token it was sent');
  check(!(await sessionCookie()), 'a wrong token set a session cookie');
  await shot('02-login-refused');
  summary.login_error = loginError;

  step = 'sign in with the keyboard';
  await page.locator('#token').focus();
  await page.keyboard.type(ADMIN_TOKEN);
  await Promise.all([page.waitForURL((u) => u.pathname === '/console'), page.keyboard.press('Enter')]);
  const accepted = loginResponses.at(-1);
  check(
    accepted?.status === 303 && accepted?.location && new URL(accepted.location, ORIGIN).pathname === '/console',
    () => `the right token answered ${JSON.stringify(accepted)}, not 303 to /console`,
  );
  await page.waitForSelector('#spend[data-loaded="true"]', { state: 'attached' });
  check(!(await page.content()).includes(ADMIN_TOKEN), 'the app page shows the admin token');
  const csrf = await page.locator('meta[name="csrf-token"]').getAttribute('content');
  check(csrf && csrf.length >= 16, `<meta name="csrf-token"> is ${JSON.stringify(csrf)}`);
  pageHealthy();

  step = 'session cookie';
  const cookie = await sessionCookie();
  check(cookie, `no ${SESSION_COOKIE} cookie after signing in`);
  check(cookie.httpOnly, `${SESSION_COOKIE} is not HttpOnly`);
  check(cookie.sameSite === 'Strict', `${SESSION_COOKIE} is SameSite=${cookie.sameSite}, not Strict`);
  check(!(await page.evaluate(() => document.cookie)).includes(SESSION_COOKIE), 'document.cookie shows the session');
  check(!cookie.value.includes(ADMIN_TOKEN), 'the cookie holds the admin token');
  summary.cookie = { httpOnly: cookie.httpOnly, sameSite: cookie.sameSite, secure: cookie.secure };

  step = 'spend';
  await openTab('spend');
  const options = (sel) => page.$$eval(`${sel} option`, (os) => os.map((o) => o.value));
  const groups = await options('#spend-group');
  check(
    JSON.stringify(groups) === JSON.stringify(['team', 'user', 'key', 'model']),
    `#spend-group options are ${JSON.stringify(groups)}, not team, user, key, model`,
  );
  check((await page.locator('#spend-group').inputValue()) === 'team', '#spend-group does not start at team');
  check(
    JSON.stringify(await options('#spend-range')) === JSON.stringify(['7', '30', '90']),
    '#spend-range options are not 7, 30, 90',
  );
  check((await page.locator('#spend-range').inputValue()) === '30', '#spend-range does not start at 30');
  check((await page.locator('#spend-chart').getAttribute('role')) === 'img', '#spend-chart has no role="img"');
  const total = await attr('#spend-total', 'data-usd');
  check(total === EXPECT.total_usd, `#spend-total data-usd is ${JSON.stringify(total)}, the ledger has "${EXPECT.total_usd}"`);
  summary.bars_by_team = await checkChart(EXPECT.by_team, EXPECT.by_team_day, 'by team');
  await checkTopSpenders(EXPECT.by_team, EXPECT.requests_by_team, EXPECT.estimated_by_team, 'by team');
  const t = EXPECT.tokens;
  const tokens = {
    input: await attr('#tokens', 'data-input'),
    output: await attr('#tokens', 'data-output'),
    cache_read: await attr('#tokens', 'data-cache-read'),
    cache_write: await attr('#tokens', 'data-cache-write'),
  };
  for (const k of Object.keys(t)) {
    check(/^\d+$/.test(tokens[k] ?? '') && Number(tokens[k]) === t[k], `#tokens ${k}: ${tokens[k]}, the ledger has ${t[k]}`);
  }
  const ratio = Number(await attr('#cache-hit-ratio', 'data-ratio'));
  const prompt = t.input + t.cache_read + t.cache_write;
  const wantRatio = prompt === 0 ? 0 : t.cache_read / prompt;
  check(ratio >= 0 && ratio <= 1, `#cache-hit-ratio data-ratio ${ratio} is not within 0..1`);
  check(
    Math.abs(ratio - wantRatio) < 1e-3,
    `#cache-hit-ratio data-ratio ${ratio}, expected cache reads / (input + cache reads + cache writes) = ${wantRatio}`,
  );
  summary.total_usd = total;
  summary.tokens = tokens;
  summary.cache_hit_ratio = ratio;
  await shot('03-spend-by-team');

  step = 'spend by model';
  const models = Object.keys(EXPECT.by_model);
  await redrawSpend(
    () => page.selectOption('#spend-group', 'model'),
    (models) => {
      const groups = [...document.querySelectorAll('#spend-chart rect.bar')].map((b) => b.getAttribute('data-group'));
      return groups.length > 0 && groups.every((g) => models.includes(g));
    },
    models,
  );
  check((await attr('#spend-total', 'data-usd')) === EXPECT.total_usd, 'the total changed with the grouping');
  summary.bars_by_model = await checkChart(EXPECT.by_model, null, 'by model');
  await checkTopSpenders(EXPECT.by_model, EXPECT.requests_by_model, null, 'by model');
  await shot('04-spend-by-model');

  step = 'spend over 7 days';
  await redrawSpend(
    () => page.selectOption('#spend-range', '7'),
    () => document.querySelectorAll('#spend-chart rect.bar').length > 0,
  );
  // Every request of the test is from today.
  check((await attr('#spend-total', 'data-usd')) === EXPECT.total_usd, 'the 7-day total differs from the ledger');
  await checkChart(EXPECT.by_model, null, 'by model, 7 days');

  step = 'budgets';
  await openTab('budgets');
  const budgets = await page.$$eval('#budget-list li.budget', (els) =>
    els.map((e) => ({
      scope: e.getAttribute('data-scope'),
      id: e.getAttribute('data-id'),
      spent: e.getAttribute('data-spent-usd'),
      limit: e.getAttribute('data-limit-usd'),
      projection: e.querySelector('.projection')?.textContent?.trim() ?? '',
    })),
  );
  const shown = Object.fromEntries(budgets.map((b) => [`${b.scope}/${b.id}`, b]));
  const want = Object.fromEntries(EXPECT.budgets.map((b) => [`${b.scope}/${b.id}`, b]));
  check(
    JSON.stringify(Object.keys(shown).sort()) === JSON.stringify(Object.keys(want).sort()),
    `#budget-list shows ${JSON.stringify(Object.keys(shown))}, the gateway has ${JSON.stringify(Object.keys(want))}`,
  );
  for (const [k, w] of Object.entries(want)) {
    const b = shown[k];
    check(nanos(b.spent, `${k} spent`) === nanos(w.spent_usd, k), `budget ${k}: spent ${b.spent}, the gateway has ${w.spent_usd}`);
    check(nanos(b.limit, `${k} limit`) === nanos(w.limit_usd, k), `budget ${k}: limit ${b.limit}, the gateway has ${w.limit_usd}`);
    check(b.projection, `budget ${k} has no .projection text`);
  }
  summary.budgets = budgets.map((b) => ({ budget: `${b.scope}/${b.id}`, projection: b.projection }));
  await shot('05-budgets');

  step = 'providers';
  await openTab('providers');
  const endpoints = await page.$$eval('#endpoint-table tr[data-provider][data-endpoint]', (els) =>
    els.map((e) => ({
      provider: e.getAttribute('data-provider'),
      endpoint: e.getAttribute('data-endpoint'),
      in_rotation: e.querySelector('.in-rotation')?.textContent?.trim() ?? null,
    })),
  );
  for (const p of EXPECT.providers) {
    const rows = endpoints.filter((e) => e.provider === p);
    check(rows.length > 0, `#endpoint-table has no row for provider ${p}: ${JSON.stringify(endpoints)}`);
    for (const r of rows) check(r.in_rotation === 'yes', `${p} ${r.endpoint}: .in-rotation is ${JSON.stringify(r.in_rotation)}, not yes`);
  }
  for (const r of endpoints) check(['yes', 'no'].includes(r.in_rotation), `${r.provider} ${r.endpoint}: .in-rotation is ${JSON.stringify(r.in_rotation)}`);
  const refusals = Object.fromEntries(
    await page.$$eval('#refusals li[data-reason]', (els) => els.map((e) => [e.getAttribute('data-reason'), e.getAttribute('data-count')])),
  );
  for (const [reason, count] of Object.entries(EXPECT.refusals)) {
    check(Number(refusals[reason]) === count, `#refusals ${reason}: ${refusals[reason]}, the gateway counted ${count} (${JSON.stringify(refusals)})`);
  }
  summary.endpoints = endpoints;
  summary.refusals = refusals;
  await shot('06-providers');

  step = 'keys';
  await openTab('keys');
  const keyIds = () => page.$$eval('#key-table tr[data-key-id]', (els) => els.map((e) => e.getAttribute('data-key-id')));
  for (const id of EXPECT.keys) check((await keyIds()).includes(id), `#key-table has no row for key ${id}`);
  check(!(await keyIds()).includes(CREATED_KEY), `key ${CREATED_KEY} exists before the test made it`);
  await shot('07-keys');

  step = 'create a key';
  await page.locator('#new-key-id').fill(CREATED_KEY);
  await page.locator('#new-key-team').fill('t1');
  await page.locator('#new-key-budget').fill('5');
  await page.selectOption('#new-key-period', 'monthly');
  await page.locator('#new-key-rpm').fill('100');
  await page.locator('#key-create button:not([type]), #key-create [type="submit"]').first().click();
  await page.waitForSelector('#secret-dialog[open]');
  const secret = (await page.locator('#secret-value').textContent()).trim();
  check(/^tg-\S+$/.test(secret), `#secret-value shows ${JSON.stringify(secret)}, not a key's secret`);
  await shot('08-secret-dialog');
  await page.locator('#secret-close').click();
  await page.waitForSelector('#secret-dialog:not([open])', { state: 'attached' });
  pageHealthy();
  const created = changes.find((c) => c.method === 'POST' && c.path === '/admin/keys');
  check(created, `creating a key sent no POST /admin/keys (${JSON.stringify(changes)})`);
  check(created.csrf === csrf, `POST /admin/keys carried x-csrf-token ${JSON.stringify(created.csrf)}, not the page's`);
  summary.secret_left_in_page = (await page.content()).includes(secret);

  step = 'use the created key';
  let used = await useKey(secret);
  check(used.status === 200, `the created key's first request answered ${used.status}: ${used.text}`);

  step = 'the created key after a reload';
  await page.reload();
  await page.waitForSelector('#spend[data-loaded="true"]', { state: 'attached' }).catch(() => {});
  await openTab('keys');
  const row = page.locator(`#key-table tr[data-key-id="${CREATED_KEY}"]`);
  check((await row.count()) === 1, `after a reload #key-table has no row for ${CREATED_KEY}`);
  check((await row.locator('button.disable').count()) === 1, `the row of ${CREATED_KEY} has no button.disable`);
  check((await row.locator('button.rotate').count()) === 1, `the row of ${CREATED_KEY} has no button.rotate`);

  step = 'rotate the created key';
  await row.locator('button.rotate').click();
  await page.waitForSelector('#secret-dialog[open]');
  const rotated = (await page.locator('#secret-value').textContent()).trim();
  check(/^tg-\S+$/.test(rotated) && rotated !== secret, `after rotate #secret-value shows ${JSON.stringify(rotated)}`);
  await page.locator('#secret-close').click();
  await page.waitForSelector('#secret-dialog:not([open])', { state: 'attached' });
  used = await useKey(secret);
  check(used.status === 401, `the secret from before the rotation answered ${used.status}, not 401: ${used.text}`);
  used = await useKey(rotated);
  check(used.status === 200, `the rotated secret answered ${used.status}: ${used.text}`);
  pageHealthy();

  step = 'disable the created key';
  await page.locator(`#key-table tr[data-key-id="${CREATED_KEY}"] button.disable`).click();
  await page.locator(`#key-table tr[data-key-id="${CREATED_KEY}"] button.enable`).waitFor();
  pageHealthy();
  await shot('09-key-disabled');
  used = await useKey(rotated);
  check([401, 403].includes(used.status), `the disabled key answered ${used.status}, not 401 or 403: ${used.text}`);
  console.log(`console: the disabled key's request answered ${used.status}: ${used.text}`);
  summary.disabled_key_status = used.status;
  for (const c of changes) check(c.csrf === csrf, `${c.method} ${c.path} from the page carried x-csrf-token ${JSON.stringify(c.csrf)}`);
  summary.changes = changes.map((c) => `${c.method} ${c.path}`);

  step = 'csrf';
  // The session alone reads...
  let probe = await fetchInPage('/admin/keys', { method: 'GET' });
  check(probe.status === 200, `GET /admin/keys with the session cookie answered ${probe.status}: ${probe.text}`);
  // ...but changes nothing without the page's token, nor with a wrong one.
  const body = JSON.stringify({ id: 'csrf-probe' });
  probe = await fetchInPage('/admin/keys', { method: 'POST', headers: { 'content-type': 'application/json' }, body });
  check(probe.status === 403, `POST /admin/keys with the cookie and no x-csrf-token answered ${probe.status}, not 403: ${probe.text}`);
  summary.csrf_refusal = probe.text;
  probe = await fetchInPage('/admin/keys', {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-csrf-token': `${csrf}0` },
    body,
  });
  check(probe.status === 403, `POST /admin/keys with a wrong x-csrf-token answered ${probe.status}, not 403: ${probe.text}`);
  probe = await fetchInPage(`/admin/keys/${CREATED_KEY}/enable`, { method: 'POST' });
  check(probe.status === 403, `POST /admin/keys/${CREATED_KEY}/enable without x-csrf-token answered ${probe.status}, not 403`);
  probe = await fetchInPage('/admin/keys/csrf-probe', { method: 'GET' });
  check(probe.status === 404, `a refused POST created key csrf-probe (GET answered ${probe.status})`);

  step = 'sign out';
  const ended = (await sessionCookie()).value;
  const logout = page.locator('form[action="/console/logout"] button:not([type]), form[action="/console/logout"] [type="submit"]');
  check((await logout.count()) >= 1, 'the app page has no sign-out button (a form posting to /console/logout)');
  await Promise.all([page.waitForNavigation(), logout.first().click()]);
  await page.locator('form#login').waitFor();
  // The session is over at the gateway, not only forgotten by the browser.
  const after = await fetch(`${ORIGIN}/admin/keys`, {
    headers: { cookie: `${SESSION_COOKIE}=${ended}` },
    signal: AbortSignal.timeout(WAIT_MS),
  });
  check(after.status === 401, `after signing out the old session cookie still reads /admin/keys (${after.status})`);
  pageHealthy();

  summary.screenshots = shots;
  summary.console_errors = consoleErrors;
  await browser.close();
  console.log(`CONSOLE-OK ${JSON.stringify(summary)}`);
  process.exit(0);
} catch (e) {
  // Playwright's own errors (a wait that timed out) say what they waited for in their message.
  const why = e instanceof Failure || e?.name === 'TimeoutError' ? e.message : e?.stack ?? String(e);
  try {
    await page.screenshot({ path: join(SCREENSHOTS, 'failure.png') });
    writeFileSync(join(SCREENSHOTS, 'failure.html'), await page.content());
  } catch {}
  console.log(`console: page ${page.url()}; page errors ${JSON.stringify(pageErrors)}; failed admin calls ${JSON.stringify(failedCalls)}; console errors ${JSON.stringify(consoleErrors)}`);
  console.log(`CONSOLE-FAIL [${step}] ${why}`);
  await browser.close().catch(() => {});
  process.exit(1);
}
