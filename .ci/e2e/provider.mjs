// OAuth 2.0 authorization server for the tokengate end-to-end check, built on oidc-provider
// (an independent implementation, so tokengate is tested against someone else's reading of
// RFC 6749 / RFC 8707 / RFC 7662, not against our own stand-in).
//
// Environment (all set by oidc.sh):
//   E2E_PORT_FILE        where to write {"port": N} once listening (port 0 = kernel picks one)
//   E2E_API_RESOURCE     the resource indicator (RFC 8707) of the upstream API
//   E2E_TOKEN_TTL        access token lifetime in seconds (default 3)
//   E2E_CLIENT_POST / E2E_SECRET         client that authenticates with client_secret_post
//   E2E_CLIENT_BASIC / E2E_SECRET_BASIC  client that authenticates with client_secret_basic
//   E2E_API_CLIENT / E2E_API_SECRET      the resource server's own credentials, for introspection
//   E2E_TLS_CERT / E2E_TLS_KEY           optional: serve HTTPS with this PEM certificate and key
//                                        (issuer https://localhost:PORT; tinyproxy.sh uses it,
//                                        because tokengate never proxies plain-http loopback)
//
// Besides oidc-provider's routes it answers GET /__e2e/stats with how many tokens it issued
// per client, what the token requests looked like (auth method, User-Agent, Accept, resource)
// and which it refused, so oidc.sh can judge tokengate's refresh behaviour and wire format.

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';

import Provider, { errors } from 'oidc-provider';

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined || v === '') throw new Error(`provider.mjs: ${name} is not set`);
  return v;
};

const PORT_FILE = env('E2E_PORT_FILE');
const RESOURCE = env('E2E_API_RESOURCE');
const TTL = Number(env('E2E_TOKEN_TTL', '3'));
const CLIENT_POST = env('E2E_CLIENT_POST');
const CLIENT_BASIC = env('E2E_CLIENT_BASIC');
const API_CLIENT = env('E2E_API_CLIENT');

const stats = { issued: {}, requests: {}, errors: [] };

const TLS = process.env.E2E_TLS_CERT
  ? { cert: fs.readFileSync(process.env.E2E_TLS_CERT), key: fs.readFileSync(env('E2E_TLS_KEY')) }
  : null;

// The provider's issuer must contain the port, so listen first and build the provider after.
let handler = (_req, res) => { res.statusCode = 503; res.end(); };
const listener = (req, res) => {
  if (req.method === 'GET' && req.url === '/__e2e/stats') {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify(stats));
    return;
  }
  handler(req, res);
};
const server = TLS ? https.createServer(TLS, listener) : http.createServer(listener);

server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = TLS ? `https://localhost:${port}` : `http://127.0.0.1:${port}`;

  const provider = new Provider(issuer, {
    // Only to silence a warning: no interactive flow (hence no cookie) is used here.
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    clients: [
      {
        client_id: CLIENT_POST,
        client_secret: env('E2E_SECRET'),
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_post',
      },
      {
        client_id: CLIENT_BASIC,
        client_secret: env('E2E_SECRET_BASIC'),
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
      },
      {
        // The upstream API: it never gets tokens, it only introspects them.
        client_id: API_CLIENT,
        client_secret: env('E2E_API_SECRET'),
        grant_types: [],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
      },
    ],
    features: {
      // Interactive flows are not used; client_credentials is off by default in oidc-provider.
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        // Only the resource server may introspect (the default lets any client do it).
        allowedPolicy: async (ctx) => ctx.oidc.client.clientId === API_CLIENT,
      },
      resourceIndicators: {
        enabled: true,
        // No default resource: tokengate must send resource=<API> itself (its extra_params);
        // a token without it has no audience and the API refuses it.
        defaultResource: async () => undefined,
        getResourceServerInfo: async (_ctx, resourceIndicator, client) => {
          if (resourceIndicator !== RESOURCE || client.clientId === API_CLIENT) {
            throw new errors.InvalidTarget(`unknown resource ${resourceIndicator}`);
          }
          return {
            scope: 'api',
            audience: RESOURCE,
            accessTokenTTL: TTL,
            // Opaque, so the API has to ask the provider (introspection) and expiry is
            // judged by the provider's clock alone.
            accessTokenFormat: 'opaque',
          };
        },
      },
    },
    ttl: { ClientCredentials: TTL },
  });

  // oidc-provider accepts client_secret_post and client_secret_basic interchangeably for a
  // client registered with either. A real server may not, and tokengate's token_auth must be
  // shown to choose the right one, so after each token request this hook refuses a mismatch
  // (replacing the already-built response, so the token never leaves) and records what the
  // request looked like. Counting issued tokens here, not on the 'saved' event, keeps
  // refused ones out of the count.
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.oidc?.route !== 'token') return;
    const clientId = ctx.oidc.client?.clientId;
    const used = ctx.headers.authorization ? 'client_secret_basic'
      : ctx.oidc.body?.client_secret ? 'client_secret_post' : 'none';
    const registered = ctx.oidc.client?.tokenEndpointAuthMethod;
    const req = stats.requests[clientId ?? '?'] ??= { auth_methods: {}, user_agents: {}, accept: {}, content_types: {}, resources: {}, statuses: {} };
    const bump = (o, k) => { o[k] = (o[k] ?? 0) + 1; };
    bump(req.auth_methods, used);
    bump(req.user_agents, ctx.get('user-agent') || '(none)');
    bump(req.accept, ctx.get('accept') || '(none)');
    bump(req.content_types, (ctx.get('content-type') || '(none)').split(';')[0]);
    bump(req.resources, String(ctx.oidc.body?.resource ?? '(none)'));
    if (ctx.status === 200 && registered && used !== registered) {
      ctx.status = 401;
      ctx.set('www-authenticate', 'Basic realm="e2e"');
      ctx.body = { error: 'invalid_client', error_description: `client ${clientId} is registered for ${registered} but used ${used}` };
      recordError(ctx, ctx.body);
    }
    bump(req.statuses, ctx.status);
    if (ctx.status === 200 && ctx.body?.access_token) bump(stats.issued, clientId);
  });
  const recordError = (ctx, err) => {
    const entry = {
      route: ctx?.oidc?.route,
      client_id: ctx?.oidc?.client?.clientId,
      error: err.error ?? err.name,
      description: err.error_description ?? err.message,
    };
    stats.errors.push(entry);
    console.error('provider error:', JSON.stringify(entry));
  };
  provider.on('grant.error', recordError);
  provider.on('introspection.error', recordError);
  provider.on('server_error', recordError);

  handler = provider.callback();

  // Written last and renamed into place, so oidc.sh never reads a half-written file.
  fs.writeFileSync(`${PORT_FILE}.tmp`, JSON.stringify({ port, issuer }));
  fs.renameSync(`${PORT_FILE}.tmp`, PORT_FILE);
  console.log(`oidc-provider ${issuer} (token ${issuer}/token, introspection ${issuer}/token/introspection), ttl ${TTL}s`);
});

for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
