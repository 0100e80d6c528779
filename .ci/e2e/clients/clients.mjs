// Node's HTTP clients pointed at tokengate, as the README's "Client recipes" show them:
// Node's built-in fetch (with undici's ProxyAgent, from npm, in proxy mode) and axios.
//
// Run by .ci/e2e/clients.sh (from .ci/e2e, whose node_modules has undici and axios), which
// judges the results: each scenario writes $OUT/<id>.txt, its first line the HTTP status (or
// `ERR <what failed>`), the rest the response body. TG_BASE is tokengate's listener
// (base-URL mode), TG_PROXY the same listener as a proxy, API the upstream's own URL (what a
// client calls in proxy mode). The environment starts with no proxy variables.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createRequire } from 'node:module';
import axios from 'axios';
// Node's built-in fetch; undici from npm only for its agents (the built-in one does not export them).
import { ProxyAgent, EnvHttpProxyAgent, getGlobalDispatcher, setGlobalDispatcher } from 'undici';

const { TG_BASE: BASE, TG_PROXY: PROXY, API, OUT } = process.env;
const TIMEOUT = 10_000;
const order = (id) => ({ order: { id, items: [1, 2, 3], note: "Zoë's café" } });

async function run(id, call) {
  let line;
  let body = '';
  try {
    [line, body] = await call();
  } catch (e) {
    // undici reports "fetch failed" and puts the reason in `cause`: that is what a user sees.
    line = `ERR ${e.message}${e.cause ? ` (${e.cause.message})` : ''}`;
  }
  writeFileSync(join(OUT, `${id}.txt`), `${String(line).replace(/\n/g, ' ')}\n${body}`);
}

const viaFetch = async (url, init = {}) => {
  const res = await fetch(url, { signal: AbortSignal.timeout(TIMEOUT), ...init });
  return [res.status, await res.text()];
};
const postJson = (body) => ({
  method: 'POST',
  headers: { 'content-type': 'application/json' },
  body: JSON.stringify(body),
});

// --- fetch -----------------------------------------------------------------------------------
await run('node-fetch-base-get', () => viaFetch(`${BASE}/v2/orders?client=node-fetch-base-get`));
await run('node-fetch-base-post', () =>
  viaFetch(`${BASE}/echo-body`, postJson(order('node-fetch-base-post'))));
// proxyTunnel: false, or undici sends CONNECT even for an http:// URL.
const proxyAgent = new ProxyAgent({ uri: PROXY, proxyTunnel: false });
await run('node-fetch-proxy-get', () =>
  viaFetch(`${API}/v2/orders?client=node-fetch-proxy-get`, { dispatcher: proxyAgent }));
await run('node-fetch-proxy-post', () =>
  viaFetch(`${API}/echo-body`, { ...postJson(order('node-fetch-proxy-post')), dispatcher: proxyAgent }));
// From HTTP_PROXY/NO_PROXY, for every fetch of the process (the built-in fetch uses the
// global dispatcher that npm's undici sets).
process.env.HTTP_PROXY = PROXY;
const envAgent = new EnvHttpProxyAgent({ proxyTunnel: false });
const before = getGlobalDispatcher();
setGlobalDispatcher(envAgent);
await run('node-fetch-env-get', () => viaFetch(`${API}/v2/orders?client=node-fetch-env-get`));
setGlobalDispatcher(before);
// The traps: without proxyTunnel: false both agents tunnel with CONNECT, which tokengate
// answers 405; fetch reports only a generic failure.
const tunnelAgent = new ProxyAgent(PROXY);
await run('node-fetch-tunnel-trap', () =>
  viaFetch(`${API}/v2/orders?client=node-fetch-tunnel-trap`, { dispatcher: tunnelAgent }));
const envTunnelAgent = new EnvHttpProxyAgent();
await run('node-fetch-env-tunnel-trap', () =>
  viaFetch(`${API}/v2/orders?client=node-fetch-env-tunnel-trap`, { dispatcher: envTunnelAgent }));
delete process.env.HTTP_PROXY;
await Promise.all([proxyAgent, envAgent, tunnelAgent, envTunnelAgent].map((a) => a.close()));

// --- axios -----------------------------------------------------------------------------------
const viaAxios = async (promise) => {
  const res = await promise;
  return [res.status, typeof res.data === 'string' ? res.data : JSON.stringify(res.data)];
};
// proxy: false: a base-URL client must not send its calls to a proxy from the environment.
const api = axios.create({ baseURL: BASE, proxy: false, timeout: TIMEOUT, validateStatus: () => true });
await run('node-axios-base-get', () =>
  viaAxios(api.get('/v2/orders', { params: { client: 'node-axios-base-get' } })));
await run('node-axios-base-post', () => viaAxios(api.post('/echo-body', order('node-axios-base-post'))));
const proxyUrl = new URL(PROXY);
const viaProxy = axios.create({
  proxy: { protocol: 'http', host: proxyUrl.hostname, port: Number(proxyUrl.port) },
  timeout: TIMEOUT,
  validateStatus: () => true,
});
await run('node-axios-proxy-get', () =>
  viaAxios(viaProxy.get(`${API}/v2/orders`, { params: { client: 'node-axios-proxy-get' } })));
await run('node-axios-proxy-post', () =>
  viaAxios(viaProxy.post(`${API}/echo-body`, order('node-axios-proxy-post'))));
process.env.HTTP_PROXY = PROXY;   // axios reads it on every request
const fromEnv = axios.create({ timeout: TIMEOUT, validateStatus: () => true });
await run('node-axios-env-get', () =>
  viaAxios(fromEnv.get(`${API}/v2/orders`, { params: { client: 'node-axios-env-get' } })));
delete process.env.HTTP_PROXY;

const require = createRequire(import.meta.url);
console.log(`node ${process.version}, undici ${require('undici/package.json').version}, axios ${axios.VERSION}`);
