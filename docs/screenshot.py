#!/usr/bin/env python3
"""Takes docs/dashboard.png from a running Eventra (the README's picture).

    python3 docs/screenshot.py http://127.0.0.1:8080 "$EVENTRA_ADMIN_TOKEN" [out.png]

Drives Debian's chromium through chromedriver's WebDriver API (standard library only):
signs in through the page, waits until the live chart has a minute of points, and
saves the page. Run it while the server is under load (BENCHMARKS.md says how the
committed picture was made).
"""
import base64
import json
import socket
import subprocess
import sys
import time
import urllib.request

DEADLINE_S = 180


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as res:
        return json.load(res)["value"]


def until(what, check):
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        try:
            value = check()
            if value:
                return value
        except Exception:  # not there yet
            pass
        time.sleep(0.25)
    sys.exit(f"timed out waiting for {what}")


def main():
    server, token = sys.argv[1].rstrip("/"), sys.argv[2]
    out = sys.argv[3] if len(sys.argv) > 3 else "docs/dashboard.png"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    driver = subprocess.Popen(["chromedriver", f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wd = f"http://127.0.0.1:{port}"
    try:
        until("chromedriver", lambda: call(wd, "GET", "/status")["ready"])
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1440,1000"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {"args": args}}}}
        session = call(wd, "POST", "/session", caps)["sessionId"]
        s = f"/session/{session}"
        try:
            call(wd, "POST", s + "/url", {"url": server + "/dashboard"})
            find = lambda css: call(wd, "POST", s + "/element", {"using": "css selector", "value": css})
            field = until("the sign-in form", lambda: find("#token"))
            eid = next(iter(field.values()))
            call(wd, "POST", f"{s}/element/{eid}/value", {"text": token})
            button = next(iter(find("#sign-in").values()))
            call(wd, "POST", f"{s}/element/{button}/click", {})
            script = "const p = document.querySelector('#chart-live path.line.processed'); return p ? p.getAttribute('d') : ''"
            until("30 points on the live chart",
                  lambda: call(wd, "POST", s + "/execute/sync", {"script": script, "args": []}).count("L") >= 30)
            png = base64.b64decode(call(wd, "GET", s + "/screenshot"))
            with open(out, "wb") as f:
                f.write(png)
            print(f"wrote {out} ({len(png)} bytes)")
        finally:
            call(wd, "DELETE", s)
    finally:
        driver.terminate()


if __name__ == "__main__":
    main()
