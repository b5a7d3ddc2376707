"""A screenshot of a page in headless Chromium after clicking the buttons a reader would click
(MLflow 3.17 shows 100 pixels of a run's description until "Show more" is clicked).

    python scripts/screenshot.py URL OUT.png [--click "Show more"] [--size 1600,1400]

Chromium's DevTools protocol over a WebSocket, with the standard library only.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request


class Socket:
    """A WebSocket client, just enough for the DevTools protocol (text frames, one connection)."""

    def __init__(self, url: str):
        host, _, path = url[len("ws://"):].partition("/")
        name, port = host.split(":")
        self.sock = socket.create_connection((name, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(f"no WebSocket at {url}: {head[:80]!r}")
        self.next_id = 0

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = self.sock.recv(n - len(out))
            if not got:
                raise RuntimeError("the browser closed the connection")
            out += got
        return out

    def send(self, method: str, **params) -> dict:
        """Send one command and return its result, skipping the events that come before it."""
        self.next_id += 1
        data = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        n = len(data)
        size = (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(bytes([0x81]) + size + mask +
                          bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
        while True:
            message = json.loads(self._message())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def _message(self) -> bytes:
        payload = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload += self._read(n)
            if b0 & 0x80:  # the final fragment
                return payload


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--click", action="append", default=[],
                   help="the text or aria-label of the buttons to click, in order")
    p.add_argument("--size", default="1600,1000")
    p.add_argument("--until", default="", help="wait until the page shows this text")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for it at most")
    a = p.parse_args()
    width, height = (int(v) for v in a.size.split(","))
    port = 9300 + os.getpid() % 500
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        browser = subprocess.Popen(
            ["chromium", "--headless=new", "--no-sandbox", "--hide-scrollbars",
             f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
                    page = next(t for t in pages if t["type"] == "page")
                    break
                except (OSError, StopIteration):
                    time.sleep(0.2)
            else:
                raise RuntimeError("chromium did not start")
            ws = Socket(page["webSocketDebuggerUrl"])
            ws.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                    deviceScaleFactor=1, mobile=False)
            ws.send("Page.navigate", url=a.url)
            deadline = time.time() + a.wait
            while time.time() < deadline and a.until and not ws.send(
                    "Runtime.evaluate", returnByValue=True,
                    expression=f"!!document.body && document.body.innerText.includes("
                               f"{json.dumps(a.until)})")["result"].get("value"):
                time.sleep(0.5)
            time.sleep(3)  # what renders after the text: images, charts
            for text in a.click:
                clicked = ws.send("Runtime.evaluate", returnByValue=True, expression=(
                    "(() => { const b = [...document.querySelectorAll('button')].filter("
                    f"e => e.innerText.trim() === {json.dumps(text)} || "
                    f"e.getAttribute('aria-label') === {json.dumps(text)}); b.forEach(e => e.click());"
                    " return b.length; })()"))["result"]["value"]
                print(f"clicked {clicked} button(s) named {text!r}")
                time.sleep(2)
            shot = ws.send("Page.captureScreenshot", format="png")
            with open(a.out, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
        finally:
            browser.terminate()
            browser.wait()
    print(f"{a.out}: {a.url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
