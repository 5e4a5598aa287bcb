"""Drives headless Chromium through the WebDriver protocol (chromedriver, plain HTTP: no
Selenium) against the orchestrator's web view.

Usage: python browser.py BASE_URL SCREENSHOT.png

Opens the page, sends a message, waits for the reply, and checks that the DOM shows latent
steps with their top tokens, a critique verdict and the reply text; reloads the page and
checks that the turn comes back from the store. Saves a screenshot of the finished turn.
Prints one JSON line of findings; exits non-zero with a message on the first failure.
"""

import base64
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

base, shot = sys.argv[1].rstrip("/"), sys.argv[2]
# Generous: a turn on a busy 2-core machine can take a minute; the test has no time limit,
# this only keeps a broken page from hanging CI forever.
TURN_WAIT_S = 600
# The W3C WebDriver key of an element reference.
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def fail(what):
    sys.exit(f"FAILED: {what}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


driver_bin = shutil.which("chromedriver") or fail("chromedriver is not installed (apt install chromium-driver)")
port = free_port()
driver = subprocess.Popen([driver_bin, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
wd = f"http://127.0.0.1:{port}"


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(wd + path, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"{}").get("value")
    except urllib.error.HTTPError as e:
        fail(f"WebDriver {method} {path}: {e.read()[:300]!r}")


for _ in range(100):
    try:
        urllib.request.urlopen(wd + "/status", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
else:
    fail("chromedriver did not start")

session = None
try:
    caps = {
        "capabilities": {
            "alwaysMatch": {
                "goog:chromeOptions": {
                    "binary": shutil.which("chromium") or "/usr/bin/chromium",
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--window-size=1400,1800"],
                }
            }
        }
    }
    session = call("POST", "/session", caps)["sessionId"]
    s = f"/session/{session}"

    def js(script, *args):
        return call("POST", s + "/execute/sync", {"script": script, "args": list(args)})

    def find(css):
        return call("POST", s + "/element", {"using": "css selector", "value": css})[ELEMENT]

    def wait_for(script, what, timeout=TURN_WAIT_S):
        end = time.time() + timeout
        while time.time() < end:
            v = js(script)
            if v:
                return v
            time.sleep(0.5)
        fail(f"waited for {what}; the page shows: {js('return document.body.innerText')[:1500]}")

    call("POST", s + "/url", {"url": base + "/"})
    wait_for("return document.querySelectorAll('#role-muse option').length > 0", "the roles to load", 60)
    box = find("#message")
    call("POST", f"{s}/element/{box}/value", {"text": "Describe the sea at night in two sentences."})
    call("POST", f"{s}/element/{find('#send')}/click", {})

    wait_for("return document.querySelector('.turn.live .reply .text')?.textContent.trim().length > 0",
             "the reply")
    found = js("""
        const live = document.querySelector('.turn.live');
        const steps = [...live.querySelectorAll('.step')];
        return {
          steps: steps.length,
          top_tokens: steps.filter(g => g.querySelector('text.tok')?.textContent.length > 0
                                        && g.querySelectorAll('rect').length > 2).length,
          verdicts: [...live.querySelectorAll('.critique .badge')].map(b => b.textContent),
          chosen: live.querySelectorAll('.attempt.chosen').length,
          bursts_ended: [...live.querySelectorAll('.burst-foot')].filter(f => f.textContent.includes('stopped')).length,
          reply: live.querySelector('.reply .text').textContent,
          session: location.hash,
        };
    """)
    if found["steps"] < 1 or found["top_tokens"] < 1:
        fail(f"latent steps with their top tokens: {found}")
    if not any(v in ("accept", "revise", "reject") for v in found["verdicts"]):
        fail(f"a critique verdict: {found}")
    if not found["reply"].strip():
        fail(f"the reply text: {found}")
    png = call("GET", s + "/screenshot")
    with open(shot, "wb") as f:
        f.write(base64.b64decode(png))

    # A reload draws the turn from the store.
    call("POST", s + "/refresh", {})
    wait_for("return document.querySelectorAll('.turn .reply .text').length > 0", "the stored turn", 60)
    stored = js("""
        return {
          reply: document.querySelector('.turn .reply .text').textContent,
          bursts: document.querySelectorAll('.stored-burst').length,
          verdicts: [...document.querySelectorAll('.critique .badge')].map(b => b.textContent),
        };
    """)
    if stored["reply"] != found["reply"]:
        fail(f"the reloaded reply {stored['reply']!r} is the streamed one {found['reply']!r}")
    if stored["bursts"] < 1 or not stored["verdicts"]:
        fail(f"the reloaded turn shows its bursts and critique: {stored}")
    found["stored"] = stored
    print(json.dumps(found))
finally:
    if session:
        call("DELETE", f"/session/{session}")
    driver.terminate()
