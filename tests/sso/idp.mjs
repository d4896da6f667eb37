// The identity provider the SSO tests sign in against: panva's certified `oidc-provider` (pinned
// in tests/sso/versions.env, installed by scripts/sso-deps.sh) on loopback, so the gateway speaks
// to the protocol as implemented (discovery, JWKS, code flow with PKCE, device flow, refresh)
// rather than to a mock of it.
//
//     TOLLGATE_SSO_NODE_PATH=.../node_modules node tests/sso/idp.mjs state.json
//
// state.json holds the clients, the users and the token lifetimes (see tests/sso/check.sh). Once
// listening on an ephemeral port it prints exactly one line to stdout,
// `ready http://127.0.0.1:<port>`, that URL being the issuer; everything else goes to stderr.
//
// Besides the provider's own routes it serves:
//   GET/POST /interaction/<uid>  the sign-in form (`login`, `password`); consent is granted
//                                without asking, the gateway being a first-party client
//   GET  /test/health            200 once serving
//   POST /test/users/<id>        {"groups":[...], "disabled":bool, "email":..., "name":...}
//                                changes a user in memory; a disabled user can no longer sign in
//                                (access_denied) nor refresh (invalid_grant)

import { createServer } from 'node:http';
import { createRequire } from 'node:module';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

// stdout carries the ready line only: oidc-provider prints its notices with console.info.
console.info = console.log = (...args) => console.error(...args);

const statePath = process.argv[2];
if (!statePath) {
  console.error('usage: node tests/sso/idp.mjs <state.json>');
  process.exit(2);
}
const state = JSON.parse(readFileSync(statePath, 'utf8'));

// ESM ignores NODE_PATH, so resolve the package from the install folder and import it by path.
const nodePath = process.env.TOLLGATE_SSO_NODE_PATH || (process.env.NODE_PATH || '').split(':')[0];
if (!nodePath) {
  console.error('error: set TOLLGATE_SSO_NODE_PATH (source scripts/sso-deps.sh && sso_deps)');
  process.exit(2);
}
const entry = createRequire(join(nodePath, 'noop.js')).resolve('oidc-provider');
const { default: Provider, errors } = await import(pathToFileURL(entry).href);

const users = new Map(state.users.map((user) => [user.id, { groups: [], disabled: false, ...user }]));
const ttl = {
  access: state.access_token_ttl ?? 60,
  id: state.id_token_ttl ?? 60,
  refresh: state.refresh_token_ttl ?? 86400,
};

// A disabled or unknown user has no account: oidc-provider then refuses the refresh_token grant
// with invalid_grant and sends an existing browser session back to the sign-in form.
function findAccount(_ctx, id) {
  const user = users.get(id);
  if (!user || user.disabled) return undefined;
  return {
    accountId: id,
    // Read at every issue, so a refresh sees groups changed through /test/users.
    async claims() {
      return {
        sub: id,
        email: user.email,
        email_verified: true,
        name: user.name,
        groups: [...user.groups],
      };
    },
  };
}

// Signing key generated per run; served at the discovery's jwks_uri.
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: randomBytes(8).toString('hex'), alg: 'RS256', use: 'sig' };

const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const page = (title, body) => `<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>${esc(title)}</title></head>
<body>
<main>
<h1>${esc(title)}</h1>
${body}
</main>
</body>
</html>
`;

const configuration = {
  // Code flow only (no implicit or hybrid): what the gateway uses.
  responseTypes: ['code'],
  clients: state.clients.map((client) => ({
    grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...client,
  })),
  // A client registered for either method may use the other: oidc-provider treats the two
  // client_secret methods as interchangeable.
  clientAuthMethods: ['client_secret_basic', 'client_secret_post'],
  scopes: ['openid', 'email', 'profile', 'groups', 'offline_access'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name'],
    groups: ['groups'],
  },
  // The scope's claims go into the ID token itself, so the gateway needs no userinfo call.
  conformIdTokenClaims: false,
  findAccount,
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  pkce: { required: () => true },
  // Refresh tokens come with a granted offline_access, in the code flow and the device flow
  // alike (the default, spelled out as the contract the tests rely on). The device flow keeps
  // offline_access as requested; the code flow keeps it only with prompt=consent (OIDC Core 11)
  // and otherwise drops it silently: no refresh token, and no error either.
  issueRefreshToken: async (_ctx, client, code) => client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access'),
  ttl: {
    AccessToken: ttl.access,
    AuthorizationCode: 60,
    DeviceCode: 600,
    IdToken: ttl.id,
    RefreshToken: ttl.refresh,
    Interaction: 600,
    // A refresh token is only as good as its grant and session: let them outlive it.
    Grant: ttl.refresh,
    Session: ttl.refresh,
  },
  features: {
    devInteractions: { enabled: false },
    revocation: { enabled: true },
    deviceFlow: {
      enabled: true,
      // Pages of our own: the stock ones pull fonts from the internet, which the tests lack.
      async userCodeInputSource(ctx, form, _out, err) {
        // AbortedError: the user aborted, or the sign-in was refused (cause: access_denied).
        const why = err?.name === 'AbortedError' ? `The sign-in was denied: ${err.cause?.error_description || 'aborted'}.` : err?.error_description || err?.message;
        const msg = err ? `<p role="alert">${esc(why)}</p>` : '';
        ctx.body = page('Device sign-in', `${msg}
<p><label for="user_code">Code shown on your device</label></p>
${form.replace('name="user_code"', 'id="user_code" name="user_code"')}
<button type="submit" form="op.deviceInputForm">Continue</button>`);
      },
      async userCodeConfirmSource(ctx, form, client, _deviceInfo, userCode) {
        ctx.body = page('Confirm device', `<p>${esc(client.clientName || client.clientId)} is asking to sign in.
Check that your device shows this code: <code id="user-code">${esc(userCode)}</code></p>
${form}
<button type="submit" form="op.deviceConfirmForm">Continue</button>
<button type="submit" form="op.deviceConfirmForm" name="abort" value="yes">Abort</button>`);
      },
      async successSource(ctx) {
        ctx.body = page('Signed in', '<p id="device-success">Your device is signed in. You can close this page.</p>');
      },
    },
  },
  async renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = page('Sign-in error', `<p role="alert"><code>${esc(out.error)}</code>: ${esc(out.error_description)}</p>`);
  },
};

function send(res, status, type, body) {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(body);
}
const sendJson = (res, status, value) => send(res, status, 'application/json', `${JSON.stringify(value)}\n`);

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

function loginPage(uid, login, error) {
  const alert = error ? `<p role="alert">${esc(error)}</p>\n` : '';
  return page('Sign in', `${alert}<form method="post" action="/interaction/${esc(uid)}">
<p><label for="login">Username</label> <input id="login" name="login" autocomplete="username" value="${esc(login)}" required autofocus></p>
<p><label for="password">Password</label> <input id="password" name="password" type="password" autocomplete="current-password" required></p>
<p><button type="submit">Sign in</button></p>
</form>`);
}

// GET shows the sign-in form, or grants consent and moves on; POST checks the credentials.
async function interaction(provider, req, res, uid) {
  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (err) {
    if (err instanceof errors.SessionNotFound) {
      return send(res, 400, 'text/html; charset=utf-8', page('Sign-in error', '<p role="alert">This sign-in has expired or was already completed. Start again.</p>'));
    }
    throw err;
  }
  const { prompt, params, session, grantId } = details;

  if (prompt.name === 'consent') {
    // First-party client: grant whatever the request is missing, as a consent click would.
    const grant = grantId ? await provider.Grant.find(grantId) : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
    if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(prompt.details.missingResourceScopes || {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const saved = await grant.save();
    return provider.interactionFinished(req, res, { consent: grantId ? {} : { grantId: saved } }, { mergeWithLastSubmission: true });
  }
  if (prompt.name !== 'login') {
    return send(res, 400, 'text/plain', `unsupported prompt ${prompt.name}\n`);
  }

  if (req.method === 'GET') return send(res, 200, 'text/html; charset=utf-8', loginPage(uid, params.login_hint));
  if (req.method !== 'POST') return send(res, 405, 'text/plain', 'method not allowed\n');

  const form = new URLSearchParams(await readBody(req));
  const login = form.get('login') || '';
  const user = users.get(login) || [...users.values()].find((u) => u.email === login);
  if (!user || user.password !== form.get('password')) {
    return send(res, 401, 'text/html; charset=utf-8', loginPage(uid, login, 'Wrong username or password.'));
  }
  if (user.disabled) {
    // Ends the request, so the device flow's poller and the code flow's callback see access_denied.
    return provider.interactionFinished(req, res, { error: 'access_denied', error_description: 'account disabled' }, { mergeWithLastSubmission: false });
  }
  return provider.interactionFinished(req, res, { login: { accountId: user.id } }, { mergeWithLastSubmission: false });
}

async function control(req, res, path) {
  if (path === '/test/health' && req.method === 'GET') return sendJson(res, 200, { ok: true });
  const m = /^\/test\/users\/([^/]+)$/.exec(path);
  if (m && req.method === 'POST') {
    const user = users.get(decodeURIComponent(m[1]));
    if (!user) return sendJson(res, 404, { error: 'no such user' });
    let body;
    try {
      body = JSON.parse((await readBody(req)) || '{}');
    } catch {
      return sendJson(res, 400, { error: 'body is not JSON' });
    }
    if ('groups' in body) {
      if (!Array.isArray(body.groups) || !body.groups.every((g) => typeof g === 'string')) return sendJson(res, 400, { error: 'groups must be an array of strings' });
      user.groups = body.groups;
    }
    if ('disabled' in body) {
      if (typeof body.disabled !== 'boolean') return sendJson(res, 400, { error: 'disabled must be a boolean' });
      user.disabled = body.disabled;
    }
    for (const key of ['email', 'name']) if (typeof body[key] === 'string') user[key] = body[key];
    const { password, ...shown } = user;
    return sendJson(res, 200, shown);
  }
  return sendJson(res, 404, { error: 'not found' });
}

// The issuer names the port, so listen first and build the provider after.
const server = createServer();
server.listen(0, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, configuration);
  provider.on('server_error', (_ctx, err) => console.error('idp: server error:', err));
  const handle = provider.callback();

  server.on('request', async (req, res) => {
    const path = new URL(req.url, issuer).pathname;
    try {
      if (path.startsWith('/test/')) return await control(req, res, path);
      const m = /^\/interaction\/([^/]+)$/.exec(path);
      if (m) return await interaction(provider, req, res, m[1]);
      return handle(req, res);
    } catch (err) {
      console.error('idp:', err);
      if (!res.headersSent) send(res, 500, 'text/plain', 'internal error\n');
      else res.end();
    }
  });
  process.stdout.write(`ready ${issuer}\n`);
});

// The test harness stops us with a signal; exit cleanly rather than die mid-write.
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)).closeAllConnections());
