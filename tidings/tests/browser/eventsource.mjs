// A page on the gateway's origin that does what a browser client of tidings does, and nothing
// more: POST /v1/session with the user token (sets the HttpOnly session cookie), then a plain
// `new EventSource(base + '/v1/stream', { withCredentials: true })` with no retry code of its own.
// Everything the page sees goes to stdout as one JSON object per line; it runs until stdin closes.
//
//   node eventsource.mjs <gateway base URL> <user token> <event names, comma-separated>
//
// Used by tidings/tests/browser_eventsource.rs; CHROMIUM overrides /usr/bin/chromium.
import { chromium } from 'playwright-core';

const [base, token, names] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify({ t: Date.now(), ...o }) + '\n');

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  // The tests run as root, where Chromium's sandbox cannot start.
  args: ['--no-sandbox'],
  headless: true,
});
try {
  const page = await browser.newPage();
  await page.exposeFunction('report', (o) => out(o));
  // What the browser itself saw on the wire for the stream (redirects included).
  page.on('response', (r) => {
    if (r.url().includes('/v1/stream')) out({ kind: 'http', url: r.url(), status: r.status() });
  });
  page.on('requestfailed', (r) => {
    if (r.url().includes('/v1/stream')) out({ kind: 'failed', url: r.url(), error: r.failure()?.errorText });
  });
  page.on('console', (m) => out({ kind: 'console', text: m.text() }));

  const landing = await page.goto(`${base}/healthz`);
  out({ kind: 'page', status: landing?.status() });
  const session = await page.evaluate(async (token) => {
    const r = await fetch('/v1/session', { method: 'POST', headers: { Authorization: `Bearer ${token}` } });
    return r.status;
  }, token);
  out({ kind: 'session', status: session });

  await page.evaluate(
    ({ base, names }) => {
      const es = new EventSource(`${base}/v1/stream`, { withCredentials: true });
      es.onopen = () => window.report({ kind: 'open' });
      es.onerror = () => window.report({ kind: 'error', readyState: es.readyState });
      for (const name of names) {
        es.addEventListener(name, (e) =>
          window.report({ kind: 'event', event: name, lastEventId: e.lastEventId, data: e.data }),
        );
      }
      window.es = es;
    },
    { base, names: names.split(',') },
  );

  // Until the test is done with us (it closes stdin), reporting readyState now and then.
  const timer = setInterval(async () => {
    try {
      out({ kind: 'state', readyState: await page.evaluate(() => window.es.readyState) });
    } catch (e) {
      out({ kind: 'state', error: String(e) });
    }
  }, 1000);
  process.stdin.resume();
  await new Promise((resolve) => process.stdin.on('end', resolve).on('close', resolve));
  clearInterval(timer);
} catch (e) {
  out({ kind: 'fatal', error: String(e?.stack || e) });
  process.exitCode = 1;
} finally {
  await browser.close();
}
