"""Python's HTTP clients pointed at tokengate, as the README's "Client recipes" show them.

Run by .ci/e2e/clients.sh, which judges the results: each scenario writes $OUT/<id>.txt,
its first line the HTTP status (or `ERR <what failed>`), the rest the response body.
TG_BASE is tokengate's listener (base-URL mode), TG_PROXY the same listener as a proxy, API
the upstream's own URL (what a client calls in proxy mode). The environment starts with no
proxy variables; scenarios that read them set them for themselves.
"""

import json
import os
import sys
import urllib.request
from contextlib import contextmanager

import httpx
import requests

BASE, PROXY, API, OUT = (os.environ[k] for k in ("TG_BASE", "TG_PROXY", "API", "OUT"))
TIMEOUT = 10


def order(cid):
    return {"order": {"id": cid, "items": [1, 2, 3], "note": "Zoë's café"}}


def run(cid, call):
    try:
        status, body = call()
        line = str(status)
    except Exception as e:  # noqa: BLE001 - every failure is a result to report
        line, body = f"ERR {type(e).__name__}: {e}", ""
    with open(os.path.join(OUT, f"{cid}.txt"), "w", encoding="utf-8") as f:
        f.write(line.replace("\n", " ") + "\n" + body)


@contextmanager
def env(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def r(res):
    return res.status_code, res.text


# --- requests ------------------------------------------------------------------------------
session = requests.Session()
run("python-requests-base-get",
    lambda: r(session.get(f"{BASE}/v2/orders", params={"client": "python-requests-base-get"},
                          timeout=TIMEOUT)))
run("python-requests-base-post",
    lambda: r(session.post(f"{BASE}/echo-body", json=order("python-requests-base-post"),
                           timeout=TIMEOUT)))
run("python-requests-proxy-get",
    lambda: r(requests.get(f"{API}/v2/orders", params={"client": "python-requests-proxy-get"},
                           proxies={"http": PROXY}, timeout=TIMEOUT)))
with env(HTTP_PROXY=PROXY):
    run("python-requests-env-post",
        lambda: r(requests.post(f"{API}/echo-body", json=order("python-requests-env-post"),
                                timeout=TIMEOUT)))
# Base URL with a (corporate) proxy in the environment: requests sends even a call to
# 127.0.0.1 there, unless NO_PROXY names it. DEAD_PROXY is a closed port: a call sent to it
# fails.
with env(HTTP_PROXY=os.environ["DEAD_PROXY"]):
    run("python-requests-base-envproxy-trap",
        lambda: r(requests.get(f"{BASE}/v2/orders",
                               params={"client": "python-requests-base-envproxy-trap"},
                               timeout=TIMEOUT)))
with env(HTTP_PROXY=os.environ["DEAD_PROXY"], NO_PROXY="127.0.0.1,localhost"):
    run("python-requests-base-noproxy-get",
        lambda: r(requests.get(f"{BASE}/v2/orders",
                               params={"client": "python-requests-base-noproxy-get"},
                               timeout=TIMEOUT)))

# --- httpx ---------------------------------------------------------------------------------
with httpx.Client(base_url=BASE, timeout=TIMEOUT) as client:
    run("python-httpx-base-get",
        lambda: r(client.get("/v2/orders", params={"client": "python-httpx-base-get"})))
    run("python-httpx-base-post",
        lambda: r(client.post("/echo-body", json=order("python-httpx-base-post"))))
with httpx.Client(proxy=PROXY, timeout=TIMEOUT) as client:
    run("python-httpx-proxy-post",
        lambda: r(client.post(f"{API}/echo-body", json=order("python-httpx-proxy-post"))))
with env(HTTP_PROXY=PROXY):
    with httpx.Client(timeout=TIMEOUT) as client:  # trust_env: reads HTTP_PROXY here
        run("python-httpx-env-get",
            lambda: r(client.get(f"{API}/v2/orders", params={"client": "python-httpx-env-get"})))


# --- urllib.request (standard library) ------------------------------------------------------
def urllib_call(opener, url, data=None):
    req = urllib.request.Request(url, data=data)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with opener.open(req, timeout=TIMEOUT) as res:
            return res.status, res.read().decode()
    except urllib.error.HTTPError as e:  # a 4xx/5xx is an answer, not a failure to call
        return e.code, e.read().decode()


direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
proxied = urllib.request.build_opener(urllib.request.ProxyHandler({"http": PROXY}))
run("python-urllib-base-get",
    lambda: urllib_call(direct, f"{BASE}/v2/orders?client=python-urllib-base-get"))
run("python-urllib-base-post",
    lambda: urllib_call(direct, f"{BASE}/echo-body",
                        json.dumps(order("python-urllib-base-post")).encode()))
run("python-urllib-proxy-get",
    lambda: urllib_call(proxied, f"{API}/v2/orders?client=python-urllib-proxy-get"))

print(f"python {sys.version.split()[0]}, requests {requests.__version__}, httpx {httpx.__version__}")
