"""A real headless chromium, driven over the DevTools protocol on a pipe: standard library only.

    with Chromium() as browser:
        browser.open(Path("report.html").as_uri())
        browser.evaluate("document.title")
        png = browser.screenshot()
        browser.console_errors(), browser.requests()   # what the page logged and fetched

Chromium is started with `--remote-debugging-pipe`: it reads commands on fd 3
and writes replies and events on fd 4, one JSON message per NUL-terminated
frame. No websocket library, no npm, no browser download: Debian's
`chromium` (`/usr/bin/chromium`, installed by .ci/run) and this file. Every
event is kept, so a test can assert on console messages, uncaught
exceptions, dialogs (an `alert()` a page should never open) and every network
request the page made. Used by tests/test_report_html.py and
bench/report_html.py.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("UNDO_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio"]


def available() -> str | None:
    """None when chromium can run here, else why not (the reason a test skips with)."""
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} is not installed (Debian: apt-get install chromium; .ci/run installs it)"
    return None


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless browser with one page (tab), its events recorded."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 120.0):
        self.width, self.height, self.timeout = width, height, timeout
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._id = 0

    def __enter__(self) -> "Chromium":
        self.profile = tempfile.mkdtemp(prefix="undo-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends become fds 3 and 4, inherited across exec
            import fcntl

            # Copies above 4 first (one may already sit on 3 or 4); dup2 then makes 3 and 4 inheritable.
            a, b = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
                                      "about:blank"], preexec_fn=fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    # --- the protocol -----------------------------------------------------------------------------

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                raise BrowserError("chromium did not answer in time")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium exited (code {self.proc.poll()})")
            self._buf += chunk
        message, _, self._buf = self._buf.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, *, session: bool = False, timeout: float | None = None, **params: Any) -> dict:
        """Send one command and wait for its reply; events that arrive meanwhile are recorded."""
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for_event(self, method: str, timeout: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            event = self._receive(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    # --- what tests use ---------------------------------------------------------------------------

    def open(self, url: str) -> float:
        """Navigate and wait for the load event; returns the seconds it took, as seen from here."""
        started = time.perf_counter()
        self.call("Page.navigate", session=True, url=url)
        self.wait_for_event("Page.loadEventFired")
        return time.perf_counter() - started

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """The value of a JavaScript expression in the page (promises awaited); page exceptions raise."""
        result = self.call("Runtime.evaluate", session=True, timeout=timeout, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, full_page: bool = False) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": size[0], "height": size[1],
                                                            "scale": 1})
        return base64.b64decode(self.call("Page.captureScreenshot", session=True, **params)["data"])

    def console_errors(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions and log entries of level error (CSP included)."""
        out = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                out.append(str(p.get("exceptionDetails", {}).get("exception", {}).get("description")
                               or p.get("exceptionDetails")))
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
                out.append(p["entry"].get("text", ""))
        return out

    def requests(self) -> list[str]:
        """The URL of every request the page made (the page itself included)."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def dialogs(self) -> list[str]:
        return [e["params"].get("message", "") for e in self.events if e.get("method") == "Page.javascriptDialogOpening"]


def main() -> None:
    """`python tests/browser.py PAGE.html OUT.png [WIDTH HEIGHT]`: a screenshot of a page, as the README's."""
    import sys
    from pathlib import Path

    page, out = Path(sys.argv[1]), Path(sys.argv[2])
    width, height = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (1280, 1500)
    with Chromium(width=width, height=height) as browser:
        browser.open(page.resolve().as_uri())
        browser.evaluate("window.undoReport ? window.undoReport.idle() : null")
        out.write_bytes(browser.screenshot())
        if browser.console_errors():
            sys.exit(f"console errors: {browser.console_errors()}")


if __name__ == "__main__":
    main()
