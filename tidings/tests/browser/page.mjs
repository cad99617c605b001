// A small remote control for headless Chromium, so a Rust test can drive the gateway's web page
// step by step: it reads one JSON command per line on stdin and answers each with one JSON line
// on stdout ({"kind":"done","id":…,"value":…} or {"kind":"error","id":…,"error":…}). Other lines
// (console output, page errors) have other kinds; the test prints them. It ends when stdin closes.
//
//   node page.mjs          (CHROMIUM overrides /usr/bin/chromium)
//
// Commands ({"id": n, "cmd": …, "ctx": "<browser context name>", …}):
//   open {url, width, height}  a new context (own cookies and storage: one user) with one page
//   goto {url} · reload · leave (to about:blank: the page is gone, its tab storage stays)
//   fill {selector, value} · press {selector, key} (focuses it, then the key) · click {selector}
//   key {key}                  presses a key where the focus is (Tab moves it, as a user would)
//   together {steps}           runs the commands in `steps` (each with its own ctx) at the same
//                              time: their values in order
//   wait {js, timeout_ms}      until the function body `js` returns something truthy; its value
//   eval {js}                  the value the function body `js` returns
//   screenshot {path}
// Used by tidings/tests/browser_page.rs and tidings/tests/browser_coupons.rs.
import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';

const out = (o) => process.stdout.write(JSON.stringify({ t: Date.now(), ...o }) + '\n');

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  // The tests run as root, where Chromium's sandbox cannot start.
  args: ['--no-sandbox'],
  headless: true,
});
const pages = new Map();

function page(ctx) {
  const p = pages.get(ctx);
  if (!p) throw new Error(`no context ${ctx}: open it first`);
  return p;
}

async function run(c) {
  switch (c.cmd) {
    case 'open': {
      const context = await browser.newContext({ viewport: { width: c.width || 390, height: c.height || 844 } });
      const p = await context.newPage();
      p.on('console', (m) => out({ kind: 'console', ctx: c.ctx, type: m.type(), text: m.text() }));
      p.on('pageerror', (e) => out({ kind: 'pageerror', ctx: c.ctx, error: String(e?.stack || e) }));
      pages.set(c.ctx, p);
      const r = await p.goto(c.url);
      return r?.status();
    }
    case 'goto':
      return (await page(c.ctx).goto(c.url))?.status();
    case 'reload':
      return (await page(c.ctx).reload())?.status();
    case 'leave':
      await page(c.ctx).goto('about:blank');
      return null;
    case 'fill':
      await page(c.ctx).fill(c.selector, c.value);
      return null;
    case 'press':
      await page(c.ctx).focus(c.selector);
      await page(c.ctx).keyboard.press(c.key);
      return null;
    case 'click':
      await page(c.ctx).click(c.selector);
      return null;
    case 'key':
      await page(c.ctx).keyboard.press(c.key);
      return null;
    case 'together':
      return await Promise.all(c.steps.map((s) => run(s).then((v) => v ?? null)));
    case 'wait': {
      const h = await page(c.ctx).waitForFunction(new Function(c.js), null, {
        timeout: c.timeout_ms || 20000,
        polling: 100,
      });
      return await h.jsonValue();
    }
    case 'eval':
      return await page(c.ctx).evaluate(new Function(c.js));
    case 'screenshot':
      await page(c.ctx).screenshot({ path: c.path, fullPage: true });
      return c.path;
    default:
      throw new Error(`unknown command ${c.cmd}`);
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let c;
  try {
    c = JSON.parse(line);
  } catch (e) {
    out({ kind: 'error', id: null, error: `not JSON: ${line}` });
    continue;
  }
  try {
    out({ kind: 'done', id: c.id, value: (await run(c)) ?? null });
  } catch (e) {
    // What the page showed, to tell why a wait failed.
    let text = null;
    try {
      text = await page(c.ctx).evaluate(() => document.body.innerText.slice(0, 3000));
    } catch {
      /* no page */
    }
    out({ kind: 'error', id: c.id, error: String(e?.message || e), page_text: text });
  }
}
await browser.close();
