"""Headless Chromium driven over the DevTools protocol with the standard library only
(``--remote-debugging-pipe``: JSON messages separated by NUL bytes on fds 3 and 4), with the
network off (a proxy to nowhere and every host unresolvable).

    with Browser() as b:
      b.open("/path/page.html")
      b.eval("document.title")
      b.click("span.tok")
      b.screenshot("page.png")
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time

NAMES = ("chromium", "chromium-browser", "google-chrome")
OFFLINE = ("--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND")


def find() -> str | None:
  """The Chromium executable, or None."""
  return next((p for p in map(shutil.which, NAMES) if p), None)


class Browser:
  """One headless Chromium with one page; ``requests`` lists every URL the page asked for."""

  def __init__(self, width: int = 1400, height: int = 900, timeout: float = 30.0):
    exe = find()
    if exe is None:
      raise FileNotFoundError("no chromium: apt-get install -y chromium")
    self.timeout = timeout
    self._profile = tempfile.mkdtemp(prefix="chromium-")
    cmd_r, self._cmd_w = os.pipe()  # we write commands, Chromium reads fd 3
    self._out_r, out_w = os.pipe()  # Chromium writes fd 4, we read
    args = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--remote-debugging-pipe",
            "--no-first-run", "--disable-extensions", "--disable-background-networking",
            f"--user-data-dir={self._profile}", f"--window-size={width},{height}", *OFFLINE,
            "about:blank"]
    # bash puts the pipe ends on fds 3 and 4 (subprocess cannot choose the numbers).
    self._proc = subprocess.Popen(
        ["bash", "-c", f'exec "$@" 3<&{cmd_r} 4>&{out_w}', "chromium", *args],
        pass_fds=(cmd_r, out_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(cmd_r)
    os.close(out_w)
    self._buf = b""
    self._next = 0
    self.events: list[dict] = []
    self.requests: list[str] = []
    page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
    self._session = self.call("Target.attachToTarget", targetId=page["targetId"],
                              flatten=True)["sessionId"]
    for domain in ("Page", "Network", "Runtime"):
      self.call(f"{domain}.enable", session=True)

  def _read(self) -> dict:
    deadline = time.monotonic() + self.timeout
    while b"\0" not in self._buf:
      if time.monotonic() > deadline:
        raise TimeoutError("chromium did not answer")
      chunk = os.read(self._out_r, 1 << 16)
      if not chunk:
        raise RuntimeError("chromium closed its DevTools pipe")
      self._buf += chunk
    msg, self._buf = self._buf.split(b"\0", 1)
    out = json.loads(msg)
    if out.get("method") == "Network.requestWillBeSent":
      self.requests.append(out["params"]["request"]["url"])
    return out

  def call(self, method: str, session: bool = False, **params) -> dict:
    """Sends one command and returns its result (events that arrive meanwhile are kept)."""
    self._next += 1
    msg = {"id": self._next, "method": method, "params": params}
    if session:
      msg["sessionId"] = self._session
    os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
    while True:
      out = self._read()
      if out.get("id") == self._next:
        if "error" in out:
          raise RuntimeError(f"{method}: {out['error']}")
        return out["result"]
      self.events.append(out)

  def wait_for(self, method: str) -> dict:
    for i, e in enumerate(self.events):
      if e.get("method") == method:
        return self.events.pop(i)
    while True:
      out = self._read()
      if out.get("method") == method:
        return out
      self.events.append(out)

  def open(self, path: str) -> None:
    self.events.clear()
    self.call("Page.navigate", session=True, url="file://" + os.path.abspath(path))
    self.wait_for("Page.loadEventFired")

  def eval(self, expression: str):
    """The value of a JavaScript expression (JSON-serialisable), raising on a page error."""
    out = self.call("Runtime.evaluate", session=True, expression=expression,
                    returnByValue=True, awaitPromise=True)
    if "exceptionDetails" in out:
      raise RuntimeError(f"{expression!r}: {out['exceptionDetails']}")
    return out["result"].get("value")

  def select(self, selector: str, value: str) -> None:
    """Chooses an option of a <select> as a user would (the page sees a change event)."""
    self.eval(f"(() => {{ const s = document.querySelector({json.dumps(selector)}); "
              f"s.value = {json.dumps(value)}; "
              "s.dispatchEvent(new Event('change', {bubbles: true})); return s.value; })()")

  def click(self, selector: str) -> None:
    """A real mouse click (pressed and released) at the centre of the element."""
    x, y = self.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                     "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
                     "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    for kind in ("mousePressed", "mouseReleased"):
      self.call("Input.dispatchMouseEvent", session=True, type=kind, x=x, y=y, button="left",
                clickCount=1)

  def screenshot(self, path: str) -> None:
    data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
    with open(path, "wb") as f:
      f.write(base64.b64decode(data))

  def close(self) -> None:
    try:
      self.call("Browser.close")
    except (RuntimeError, OSError, TimeoutError):
      pass
    try:
      self._proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self._proc.kill()
      self._proc.wait()
    os.close(self._cmd_w)
    os.close(self._out_r)
    shutil.rmtree(self._profile, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
