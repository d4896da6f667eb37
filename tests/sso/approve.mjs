// Approves a device-flow sign-in the way a person would: in a real browser (Debian's Chromium,
// headless, driven by playwright-core; both from scripts/console-deps.sh) against the test
// identity provider (tests/sso/idp.mjs). Opens the verification URL, confirms the code, signs
// in, and checks the provider's success page.
//
//     TOLLGATE_CONSOLE_NODE_PATH=... TOLLGATE_CHROMIUM=/usr/bin/chromium \
//         node tests/sso/approve.mjs <verification_uri_complete> <user> <password>
//
// Prints `approved` and exits 0, or `approve: [step] why` on stderr and exits 1.

import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const WAIT_MS = 10_000;

const [url, user, password] = process.argv.slice(2);
if (!url || !user || password === undefined) {
  console.error('usage: node tests/sso/approve.mjs <verification_uri_complete> <user> <password>');
  process.exit(2);
}
for (const name of ['TOLLGATE_CONSOLE_NODE_PATH', 'TOLLGATE_CHROMIUM']) {
  if (!process.env[name]) {
    console.error(`approve: [setup] ${name} is not set (source scripts/console-deps.sh && console_deps)`);
    process.exit(2);
  }
}

// ESM ignores NODE_PATH: import playwright-core by path.
const { chromium } = await import(
  pathToFileURL(join(process.env.TOLLGATE_CONSOLE_NODE_PATH, 'playwright-core', 'index.mjs')).href
);

const args = ['--no-proxy-server', '--disable-gpu', '--disable-dev-shm-usage'];
// Chromium's sandbox refuses to start as root (CI runs as root).
if (process.getuid?.() === 0) args.push('--no-sandbox');

let step = 'launch';
const browser = await chromium.launch({ executablePath: process.env.TOLLGATE_CHROMIUM, headless: true, args, timeout: 30_000 });
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(WAIT_MS);

  // Waits for what the step expects, or fails at once with the provider's error message.
  const expect = async (selector) => {
    const alert = page.locator('[role=alert]');
    await page.locator(selector).or(alert).first().waitFor();
    if (await alert.count()) {
      throw new Error(`${page.url()} (${await page.title()}): ${(await alert.first().textContent()).trim()}`);
    }
  };

  // The URL carries the code; the provider re-posts it (a self-submitting form) to its confirm page.
  step = 'confirm code';
  await page.goto(url);
  await expect('#user-code');
  const shown = (await page.locator('#user-code').textContent()).trim();
  const sent = new URL(url).searchParams.get('user_code');
  const normalize = (code) => code.replace(/[^A-Za-z0-9]/g, '').toUpperCase();
  if (sent && normalize(shown) !== normalize(sent)) throw new Error(`the page shows code ${shown}, the URL has ${sent}`);
  await page.getByRole('button', { name: 'Continue' }).click();

  // Consent is granted by the provider itself (first-party client): signing in is the last step.
  step = 'sign in';
  await expect('input[name=password]');
  await page.getByLabel('Username').fill(user);
  await page.getByLabel('Password').fill(password);
  await page.getByRole('button', { name: 'Sign in' }).click();

  step = 'success page';
  await expect('#device-success');
  console.log('approved');
} catch (err) {
  console.error(`approve: [${step}] ${err.message.split('\n')[0]}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
