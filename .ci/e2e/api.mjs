// The upstream API for the tokengate end-to-end check: plain node:http, no framework.
//
// It accepts a request only if `Authorization: Bearer <token>` carries a token that the
// authorization server, asked by RFC 7662 introspection on every request (no caching, so an
// expired token is refused the moment the provider considers it expired), reports as active,
// of type Bearer, and issued for this API (aud = E2E_API_RESOURCE). Then 200 {"ok":true};
// otherwise 401 with a WWW-Authenticate challenge, as a real resource server would.
//
// Environment (all set by oidc.sh):
//   E2E_PORT_FILE       where to write {"port": N} once listening
//   E2E_INTROSPECT_URL  the provider's introspection endpoint
//   E2E_API_RESOURCE    this API's resource indicator, expected as the token's audience
//   E2E_API_CLIENT / E2E_API_SECRET  this API's credentials at the provider
//   E2E_TLS_CERT / E2E_TLS_KEY  optional: serve HTTPS with this PEM certificate and key (an
//                       https introspection URL then needs NODE_EXTRA_CA_CERTS for its CA)
//
// GET /__e2e/stats (no auth; only oidc.sh calls it directly) returns per client_id the
// distinct tokens accepted, plus counts of accepted and refused requests and why.

import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`api.mjs: ${name} is not set`);
  return v;
};

const PORT_FILE = env('E2E_PORT_FILE');
const INTROSPECT_URL = env('E2E_INTROSPECT_URL');
const RESOURCE = env('E2E_API_RESOURCE');
const BASIC = `Basic ${Buffer.from(`${encodeURIComponent(env('E2E_API_CLIENT'))}:${encodeURIComponent(env('E2E_API_SECRET'))}`).toString('base64')}`;

const tokensByClient = new Map(); // client_id -> Set(token)
const stats = { accepted: 0, rejected: 0, reasons: {}, requests_without_request_id: 0 };

async function introspect(token) {
  const res = await fetch(INTROSPECT_URL, {
    method: 'POST',
    headers: { authorization: BASIC, 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' },
    body: new URLSearchParams({ token, token_type_hint: 'access_token' }),
    signal: AbortSignal.timeout(5000),
  });
  if (res.status !== 200) throw new Error(`introspection answered ${res.status}: ${await res.text()}`);
  return res.json();
}

// Returns [client_id, null] if the token is good, [null, reason] if not.
async function check(req) {
  const m = /^Bearer +([^ ]+) *$/i.exec(req.headers.authorization ?? '');
  if (!m) return [null, req.headers.authorization ? 'malformed_authorization' : 'no_authorization'];
  const info = await introspect(m[1]);
  if (info.active !== true) return [null, 'inactive_or_expired'];
  if (String(info.token_type).toLowerCase() !== 'bearer') return [null, `token_type_${info.token_type}`];
  const aud = Array.isArray(info.aud) ? info.aud : [info.aud];
  if (!aud.includes(RESOURCE)) return [null, 'wrong_audience'];
  let seen = tokensByClient.get(info.client_id);
  if (!seen) tokensByClient.set(info.client_id, (seen = new Set()));
  seen.add(m[1]);
  return [info.client_id, null];
}

const TLS = process.env.E2E_TLS_CERT
  ? { cert: fs.readFileSync(process.env.E2E_TLS_CERT), key: fs.readFileSync(env('E2E_TLS_KEY')) }
  : null;

const listener = async (req, res) => {
  // Drain the body: the check is about headers only.
  for await (const _ of req);
  if (req.method === 'GET' && req.url === '/__e2e/stats') {
    const tokens = {};
    for (const [client, set] of tokensByClient) tokens[client] = [...set];
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ ...stats, tokens }));
    return;
  }
  let client; let reason;
  try {
    [client, reason] = await check(req);
  } catch (err) {
    console.error('api: introspection failed:', err.message);
    res.writeHead(503, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ ok: false, error: 'introspection_failed' }));
    return;
  }
  if (!req.headers['x-request-id']) stats.requests_without_request_id += 1;
  if (client) {
    stats.accepted += 1;
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ ok: true }));
  } else {
    stats.rejected += 1;
    stats.reasons[reason] = (stats.reasons[reason] ?? 0) + 1;
    console.error(`api: 401 ${req.method} ${req.url}: ${reason}`);
    res.writeHead(401, {
      'content-type': 'application/json',
      'www-authenticate': `Bearer error="invalid_token", error_description="${reason}"`,
    });
    res.end(JSON.stringify({ ok: false, error: reason }));
  }
};
const server = TLS ? https.createServer(TLS, listener) : http.createServer(listener);

server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  fs.writeFileSync(`${PORT_FILE}.tmp`, JSON.stringify({ port }));
  fs.renameSync(`${PORT_FILE}.tmp`, PORT_FILE);
  console.log(`api ${TLS ? 'https://localhost' : 'http://127.0.0.1'}:${port}, introspecting at ${INTROSPECT_URL}`);
});

for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
