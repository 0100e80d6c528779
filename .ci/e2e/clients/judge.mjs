// Judges the result files the client programs wrote, for .ci/e2e/clients.sh.
//
//   node judge.mjs RESULTS_DIR API_AUTHORITY < expectations
//
// Each expectation line is `KIND ID DESCRIPTION...`; each result file RESULTS_DIR/ID.txt has
// the HTTP status (or `ERR <what failed>`) on its first line, then the response body. Prints
// one line per expectation, `ok\tDESCRIPTION (detail)` or `FAIL\tDESCRIPTION (detail)`, and a
// FAIL for every result file no expectation names, so no scenario goes unjudged.
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

const [dir, authority] = process.argv.slice(2);
const NOTE = "Zoë's café";

// Each returns null when the result is as expected, else what is wrong.
const kinds = {
  // The call reached the stand-in's API through tokengate, with the Bearer token.
  get(id, status, body) {
    if (status !== '200') return `status ${status}`;
    const o = JSON.parse(body);
    if (o.token_ok !== true) return 'the API did not see a valid token';
    if (o.path !== '/v2/orders' || !(o.query ?? '').split('&').includes(`client=${id}`)) {
      return `arrived as ${o.path}?${o.query}`;
    }
    if (o.headers.host !== authority) return `Host ${o.headers.host}, not the upstream's ${authority}`;
    if (!o.headers['x-request-id']) return 'no X-Request-Id from tokengate';
    return null;
  },
  // A POST whose JSON body arrived intact (/echo-body answers only a valid token).
  post(id, status, body) {
    if (status !== '200') return `status ${status}`;
    const o = JSON.parse(body);
    const ok = o.order?.id === id && JSON.stringify(o.order.items) === '[1,2,3]' && o.order.note === NOTE;
    return ok ? null : `the API got ${body.slice(0, 120)}`;
  },
  // Java's default HttpClient offered an h2c upgrade: tokengate answered over HTTP/1.1, and
  // did not pass the upgrade on (hop-by-hop, RFC 9110 §7.6.1).
  h2c(id, status, body, line) {
    if (line !== '200 HTTP_1_1') return `answer ${line}`;
    const o = JSON.parse(body);
    const leaked = ['upgrade', 'http2-settings', 'connection'].filter((h) => h in o.headers);
    if (leaked.length) return `the API received ${leaked.join(', ')}`;
    return kinds.get(id, status, body);
  },
  // A trap: the client went straight to the API, past tokengate, and got its 401 (wget keeps
  // no 401 body; it reports the WWW-Authenticate header on the status line instead).
  bypass(id, status, body, line) {
    if (status !== '401') return `status ${status}`;
    if (body === '' && /Bearer error="invalid_token"/.test(line)) return null;
    return JSON.parse(body).error === 'invalid_token' ? null : `body ${body.slice(0, 120)}`;
  },
  // A trap: undici tunnelled with CONNECT; all the user sees is a generic fetch failure.
  connect(id, status, body, line) {
    return /^ERR fetch failed/.test(line) ? null : `got ${line}`;
  },
  // A trap: the client sent a base-URL call to the proxy from its environment.
  proxyerror(id, status, body, line) {
    return /^ERR ProxyError/.test(line) ? null : `got ${line}`;
  },
};

const expected = readFileSync(0, 'utf8').split('\n').map((l) => l.trim()).filter(Boolean);
const seen = new Set();
for (const entry of expected) {
  const [kind, id, ...words] = entry.split(/\s+/);
  const what = words.join(' ');
  seen.add(id);
  let line = '';
  let problem;
  try {
    const text = readFileSync(join(dir, `${id}.txt`), 'utf8');
    const nl = text.indexOf('\n');
    line = nl < 0 ? text : text.slice(0, nl);
    const body = nl < 0 ? '' : text.slice(nl + 1);
    problem = kinds[kind](id, line.split(' ')[0], body, line);
  } catch (e) {
    problem = e.code === 'ENOENT' ? 'no result: the scenario did not run' : `${e.message} (${line})`;
  }
  console.log(`${problem ? 'FAIL' : 'ok'}\t${what} [${id}: ${problem ?? line}]`);
}
for (const file of readdirSync(dir)) {
  const id = file.replace(/\.txt$/, '');
  if (!seen.has(id)) console.log(`FAIL\tevery scenario is judged [${id} has no expectation]`);
}
if (!expected.length) console.log('FAIL\tthere are expectations to judge [none given]');
