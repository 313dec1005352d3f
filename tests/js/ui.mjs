// ui.mjs: a headless-browser driver for relaygate's integration tests.
//
// The Rust tests spawn `node tests/js/ui.mjs`, write one JSON command per line on its stdin and
// read exactly one JSON answer line per command on its stdout ({"ok":true,...} or
// {"ok":false,"error":"..."}), to check the operator dashboard (/ui/) of a running gateway or
// agent in a real browser. It drives the system chromium (no browser download) through
// playwright-core. `{"ready":true}` is printed once the browser is up. See README.md.
//
// Commands (each may carry "timeout_ms", default 5000):
//   open {url, token?, viewport?}   new page (closes the previous one)
//   wait {selector}                 until a match is visible             -> elapsed_ms
//   wait_text {selector, text}      until some match's innerText has it  -> elapsed_ms
//   wait_gone {selector}            until no match is visible            -> elapsed_ms
//   text {selector} / texts {selector} / attr {selector, name} / count {selector}
//   click {selector} / fill {selector, value} / screenshot {path}
//   errors                          console errors, page errors, failed requests so far
//   overflow                        whether the page is wider than the window
//   quit                            closes the browser and exits 0 (so does the end of stdin)

import readline from 'node:readline';
import { chromium } from 'playwright-core';

const TOKEN_KEY = 'relaygate-admin-token';

function reply(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

let browser = null;
let context = null;
let page = null;
let errors = [];
let closing = null;

// Closes the browser (once) and exits.
function shutdown(code) {
  if (!closing) {
    closing = (async () => {
      const timer = setTimeout(() => process.exit(code), 5000); // never hang on close
      try { if (browser) await browser.close(); } catch (_) { /* already gone */ }
      clearTimeout(timer);
      process.exit(code);
    })();
  }
  return closing;
}

for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP']) process.on(sig, () => shutdown(0));
process.stdout.on('error', () => shutdown(0)); // the test went away

function need(cmd, ...fields) {
  for (const f of fields) {
    if (cmd[f] === undefined || cmd[f] === null) throw new Error(`"${cmd.op}" needs "${f}"`);
  }
  if (!page && cmd.op !== 'open') throw new Error('no page: send "open" first');
}

// Polls check() (async, returns truthy when done) until it holds or the timeout passes.
async function poll(timeout, what, check) {
  const start = Date.now();
  for (;;) {
    if (await check()) return Date.now() - start;
    if (Date.now() - start >= timeout) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function open(cmd, timeout) {
  if (context) await context.close().catch(() => {});
  errors = [];
  context = await browser.newContext({ viewport: cmd.viewport || { width: 1280, height: 800 } });
  page = await context.newPage();
  page.setDefaultTimeout(timeout);
  if (cmd.token != null) {
    await page.addInitScript(([k, t]) => { window.sessionStorage.setItem(k, t); }, [TOKEN_KEY, cmd.token]);
  }
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    const where = m.location().url || '';
    // Chromium logs every non-2xx answer as "Failed to load resource". An API call (/v1/...) that
    // is refused is part of what the tests drive (401 before the token, a rejected action), so only
    // such lines about other URLs (the page's own assets) count.
    if (m.text().startsWith('Failed to load resource')) {
      if (new URL(where, 'http://x/').pathname.startsWith('/v1/')) return;
      errors.push(`console: ${m.text()} (${where})`);
      return;
    }
    errors.push(`console: ${m.text()}`);
  });
  page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  page.on('requestfailed', (r) => {
    const why = r.failure() ? r.failure().errorText : 'failed';
    if (why !== 'net::ERR_ABORTED') errors.push(`request failed: ${r.method()} ${r.url()}: ${why}`);
  });
  const res = await page.goto(cmd.url, { waitUntil: 'load', timeout });
  return { status: res ? res.status() : null };
}

async function run(cmd) {
  const timeout = cmd.timeout_ms ?? 5000;
  const loc = () => page.locator(cmd.selector);
  switch (cmd.op) {
    case 'open':
      need(cmd, 'url');
      return open(cmd, timeout);
    case 'wait': {
      need(cmd, 'selector');
      const start = Date.now();
      await loc().filter({ visible: true }).first().waitFor({ state: 'attached', timeout });
      return { elapsed_ms: Date.now() - start };
    }
    case 'wait_text': {
      need(cmd, 'selector', 'text');
      let seen = [];
      try {
        const elapsed = await poll(timeout, `text "${cmd.text}" in ${cmd.selector}`, async () => {
          seen = await loc().allInnerTexts();
          return seen.some((t) => t.includes(cmd.text));
        });
        return { elapsed_ms: elapsed };
      } catch (e) {
        throw new Error(`${e.message}; last seen: ${JSON.stringify(seen.slice(0, 5)).slice(0, 500)}`);
      }
    }
    case 'wait_gone': {
      need(cmd, 'selector');
      const elapsed = await poll(timeout, `${cmd.selector} to be gone`,
        async () => (await loc().filter({ visible: true }).count()) === 0);
      return { elapsed_ms: elapsed };
    }
    case 'text':
      need(cmd, 'selector');
      return { text: await loc().first().innerText({ timeout }) };
    case 'texts':
      need(cmd, 'selector');
      return { texts: await loc().allInnerTexts() };
    case 'attr':
      need(cmd, 'selector', 'name');
      return { value: await loc().first().getAttribute(cmd.name, { timeout }) };
    case 'count':
      need(cmd, 'selector');
      return { count: await loc().count() };
    case 'click':
      need(cmd, 'selector');
      await loc().first().click({ timeout });
      return {};
    case 'fill':
      need(cmd, 'selector', 'value');
      await loc().first().fill(String(cmd.value), { timeout });
      return {};
    case 'screenshot':
      need(cmd, 'path');
      await page.screenshot({ path: cmd.path, fullPage: true, timeout });
      return { path: cmd.path };
    case 'errors':
      need(cmd);
      return { errors: [...errors] };
    case 'overflow':
      need(cmd);
      return { overflow: await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth) };
    case 'quit':
      return { quit: true };
    default:
      throw new Error(`unknown op ${JSON.stringify(cmd.op)}`);
  }
}

try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--headless', '--disable-background-networking', '--disable-dev-shm-usage'],
  });
} catch (e) {
  reply({ ready: false, error: `cannot launch chromium: ${e.message}` });
  process.exit(1);
}
browser.on('disconnected', () => {
  if (!closing) { reply({ ok: false, error: 'the browser went away' }); process.exit(1); }
});
reply({ ready: true });

// One command at a time, in order.
const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  let cmd;
  try {
    cmd = JSON.parse(line);
    if (!cmd || typeof cmd !== 'object') throw new Error('a command is a JSON object');
  } catch (e) {
    reply({ ok: false, error: `bad command: ${e.message}` });
    continue;
  }
  try {
    const out = await run(cmd);
    if (out.quit) { reply({ ok: true }); await shutdown(0); }
    reply({ ok: true, ...out });
  } catch (e) {
    // Playwright's message and call log, on one line
    const msg = String(e && e.message ? e.message : e).replace(/\u001b\[[0-9;]*m/g, '');
    reply({ ok: false, error: msg.trim().replace(/\s*\n\s*/g, ' | ').slice(0, 2000) });
  }
}
await shutdown(0); // stdin closed
