#!/usr/bin/env bash
# Self-test of the SSO tests' identity provider (tests/sso/idp.mjs) and device-flow approver
# (tests/sso/approve.mjs), outside cargo: a device-flow sign-in approved in Chromium, a code-flow
# sign-in with PKCE done by a plain HTTP client, group changes seen on refresh, and a disabled
# user refused both. Run it after bumping tests/sso/versions.env:
#     tests/sso/check.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
. scripts/sso-deps.sh && sso_deps
. scripts/console-deps.sh && console_deps

tmp="$(mktemp -d)"
idp_pid=
cleanup() { [ -n "$idp_pid" ] && kill "$idp_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

cat >"$tmp/state.json" <<'EOF'
{"clients":[{"client_id":"tollgate","client_secret":"s3cret-of-the-gateway","redirect_uris":["http://127.0.0.1:1/sso/callback"]}],
 "users":[{"id":"alice","password":"alice-pw","email":"alice@example.com","name":"Alice","groups":["eng"],"disabled":false}],
 "access_token_ttl":60, "id_token_ttl":60, "refresh_token_ttl":86400}
EOF

node tests/sso/idp.mjs "$tmp/state.json" >"$tmp/idp.out" 2>"$tmp/idp.err" &
idp_pid=$!
for _ in $(seq 100); do grep -q '^ready ' "$tmp/idp.out" && break; sleep 0.1; done
issuer="$(sed -n 's/^ready //p' "$tmp/idp.out")"
[ -n "$issuer" ] || { echo "FAIL: idp did not start"; cat "$tmp/idp.err"; exit 1; }
echo "ok   idp ready at $issuer"

python3 - "$issuer" <<'EOF' || { echo "--- idp stderr"; cat "$tmp/idp.err"; exit 1; }
import base64, hashlib, http.cookiejar, json, secrets, subprocess, sys, time, urllib.error, urllib.parse, urllib.request

issuer = sys.argv[1]
CLIENT, SECRET, REDIRECT = "tollgate", "s3cret-of-the-gateway", "http://127.0.0.1:1/sso/callback"
SCOPE = "openid email profile groups offline_access"

def ok(msg): print(f"ok   {msg}", flush=True)
def fail(msg): print(f"FAIL {msg}", flush=True); sys.exit(1)

def call(url, form=None, js=None, basic=False, opener=urllib.request.build_opener()):
    headers, data = {}, None
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
    if js is not None:
        data, headers["content-type"] = json.dumps(js).encode(), "application/json"
    if basic:
        headers["authorization"] = "Basic " + base64.b64encode(f"{CLIENT}:{SECRET}".encode()).decode()
    try:
        with opener.open(urllib.request.Request(url, data, headers)) as r:
            return r.status, r.read().decode(), r.url
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.url

def b64json(part): return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))

def claims(jwt):
    header, payload, _ = jwt.split(".")
    header = b64json(header)
    if header.get("alg") != "RS256" or header.get("kid") not in kids: fail(f"id_token header {header}, JWKS kids {kids}")
    return b64json(payload)

def check_id_token(tokens, groups, what):
    if "id_token" not in tokens: fail(f"{what}: no id_token in {sorted(tokens)}")
    c = claims(tokens["id_token"])
    if c.get("sub") != "alice" or c.get("email") != "alice@example.com" or c.get("name") != "Alice" or c.get("groups") != groups:
        fail(f"{what}: id_token claims {c}")
    return c

disco = json.loads(call(f"{issuer}/.well-known/openid-configuration")[1])
kids = [k["kid"] for k in json.loads(call(disco["jwks_uri"])[1])["keys"]]
ok(f"discovery: device {disco['device_authorization_endpoint']}, token {disco['token_endpoint']}")

# Device flow, approved in the browser.
status, body, _ = call(disco["device_authorization_endpoint"], {"client_id": CLIENT, "client_secret": SECRET, "scope": SCOPE})
if status != 200: fail(f"device authorization: {status} {body}")
dev = json.loads(body)
ok(f"device authorization: user_code {dev['user_code']}, {dev['verification_uri_complete']}")
t0 = time.time()
out = subprocess.run(["node", "tests/sso/approve.mjs", dev["verification_uri_complete"], "alice", "alice-pw"], capture_output=True, text=True)
if out.returncode != 0 or out.stdout.strip() != "approved": fail(f"approve.mjs: {out.returncode} {out.stdout}{out.stderr}")
ok(f"approve.mjs: approved in {time.time() - t0:.1f}s")

for _ in range(30):
    status, body, _ = call(disco["token_endpoint"], {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": dev["device_code"]}, basic=True)
    if status != 400 or json.loads(body).get("error") != "authorization_pending": break
    time.sleep(1)
if status != 200: fail(f"device token: {status} {body}")
tokens = json.loads(body)
c = check_id_token(tokens, ["eng"], "device token")
if "refresh_token" not in tokens: fail(f"device token: no refresh_token ({sorted(tokens)})")
ok(f"device token: id_token {c}, refresh_token, scope {tokens.get('scope')!r}")
refresh = tokens["refresh_token"]

status, body, _ = call(f"{issuer}/test/users/alice", js={"groups": ["eng", "data"]})
if status != 200: fail(f"/test/users: {status} {body}")
status, body, _ = call(disco["token_endpoint"], {"grant_type": "refresh_token", "refresh_token": refresh, "client_id": CLIENT, "client_secret": SECRET})
if status != 200: fail(f"refresh: {status} {body}")
tokens = json.loads(body)
c = check_id_token(tokens, ["eng", "data"], "refresh")
ok(f"refresh after group change: groups {c['groups']}, refresh_token {'same' if tokens.get('refresh_token') == refresh else 'rotated'}")

# Code flow with PKCE, as a plain HTTP client: follow redirects up to the gateway's callback.
class StopAtCallback(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if newurl.startswith(REDIRECT): raise urllib.error.HTTPError(newurl, code, "callback", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)

def code_flow(user, password, prompt="consent"):
    browser = urllib.request.build_opener(StopAtCallback, urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    q = {"client_id": CLIENT, "response_type": "code", "redirect_uri": REDIRECT, "scope": SCOPE, "state": "st", "nonce": "n", "code_challenge": challenge, "code_challenge_method": "S256"}
    if prompt: q["prompt"] = prompt
    status, page, url = call(disco["authorization_endpoint"] + "?" + urllib.parse.urlencode(q), opener=browser)
    if status != 200 or 'name="password"' not in page: fail(f"authorize: {status} {url} {page[:200]}")
    try:
        browser.open(urllib.request.Request(url, urllib.parse.urlencode({"login": user, "password": password}).encode()))
    except urllib.error.HTTPError as e:
        if not e.url.startswith(REDIRECT): raise
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(e.url).query)), verifier
    fail("sign-in did not reach the callback")

status, _, url = call(disco["authorization_endpoint"] + "?" + urllib.parse.urlencode({"client_id": CLIENT, "response_type": "code", "redirect_uri": REDIRECT, "scope": "openid"}), opener=urllib.request.build_opener(StopAtCallback))
err = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
if err.get("error") != "invalid_request": fail(f"authorize without PKCE: {status} {url}")
ok(f"authorize without code_challenge: callback error={err['error']} ({err.get('error_description')})")

def exchange(cb, verifier):
    if "code" not in cb: fail(f"code flow callback: {cb}")
    status, body, _ = call(disco["token_endpoint"], {"grant_type": "authorization_code", "code": cb["code"], "redirect_uri": REDIRECT, "code_verifier": verifier}, basic=True)
    if status != 200: fail(f"code token: {status} {body}")
    tokens = json.loads(body)
    if check_id_token(tokens, ["eng", "data"], "code token").get("nonce") != "n": fail("code token: nonce missing")
    return tokens

# offline_access counts in the code flow only with prompt=consent (OIDC Core 11): pin both sides.
tokens = exchange(*code_flow("alice", "alice-pw"))
if "refresh_token" not in tokens: fail(f"code flow with prompt=consent: no refresh_token ({sorted(tokens)})")
ok(f"code flow with PKCE and prompt=consent: id_token and refresh_token, scope {tokens['scope']!r}")
tokens = exchange(*code_flow("alice", "alice-pw", prompt=None))
if "refresh_token" in tokens: fail("code flow without prompt=consent: got a refresh_token (oidc-provider changed?)")
ok(f"code flow without prompt: id_token, no refresh_token, scope {tokens['scope']!r}")

# A disabled user: refresh refused, sign-in refused.
status, body, _ = call(f"{issuer}/test/users/alice", js={"disabled": True})
if status != 200: fail(f"/test/users: {status} {body}")
status, body, _ = call(disco["token_endpoint"], {"grant_type": "refresh_token", "refresh_token": refresh}, basic=True)
if status != 400 or json.loads(body).get("error") != "invalid_grant": fail(f"refresh of a disabled user: {status} {body}")
ok(f"refresh of a disabled user: 400 {body.strip()}")
cb, _ = code_flow("alice", "alice-pw")
if cb.get("error") != "access_denied": fail(f"sign-in of a disabled user: {cb}")
ok(f"sign-in of a disabled user: callback error={cb['error']} ({cb.get('error_description')})")
EOF
echo "PASS"
