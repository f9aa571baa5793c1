"""Open a subject report and the group report in headless Chromium, as a person would.

Needs Debian's ``chromium`` (``.ci/run`` installs it); skipped with a reason otherwise.
"""
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed "
                                "(apt-get install chromium; .ci/run does this)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--window-size=1200,900"]


def _chromium(tmp_path, *args):
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_errors(stderr: str) -> list[str]:
    """Console lines Chromium logged (our pages log nothing, so any line is a problem)."""
    return [ln for ln in stderr.splitlines() if "Uncaught" in ln or ":CONSOLE" in ln]


@pytest.mark.parametrize("page", ["sub-01.html", "group_T1w.html", "index.html"])
def test_page_loads_without_errors_and_renders(group_run, tmp_path, page):
    dv, _ = group_run
    url = (dv.root / page).as_uri()
    dom = _chromium(tmp_path, "--dump-dom", url + "#selftest")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "selfcheck:ok" in dom.stdout, dom.stdout[-2000:]
    assert "selftest:ok" in dom.stdout, dom.stdout[-2000:]
    assert _console_errors(dom.stderr) == []
    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", url)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert _console_errors(res.stderr) == []
    a = np.asarray(Image.open(shot).convert("RGB"))
    assert a.shape[1] == 1200
    colours = np.unique(a.reshape(-1, 3), axis=0)
    assert len(colours) > 50, "screenshot is (nearly) blank"
    # keep a copy for people to look at when the test runs locally
    out = dv.root.parent / f"screenshot_{page}.png"
    shutil.copy(shot, out)


# --------------------------------------------------------------------------- a rater's session
class _Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    fd 3 reads commands, fd 4 writes replies, NUL-terminated JSON), so a test can press
    real keys, reload and download without a driver package."""

    def __init__(self, profile, downloads):
        import json
        import os
        import queue
        import threading

        self._json = json
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def child_fds():
            # via fresh copies: a pipe end that already is fd 3 or 4 would keep its
            # close-on-exec flag through a dup2 onto itself
            r, w = os.dup(cmd_r), os.dup(out_w)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS[:-1], "--window-size=1400,1000", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=child_fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(cmd_r)
        os.close(out_w)
        self._messages = queue.Queue()
        self.events, self.errors, self._next = [], [], 0
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime"):
            self.call(f"{domain}.enable", session=True)
        self.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads),
                  eventsEnabled=True)

    def _read(self):
        import os

        buf = b""
        while True:
            chunk = os.read(self._out_r, 65536)
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self._messages.put(self._json.loads(msg))

    def _event(self, msg):
        self.events.append(msg)
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(params["exceptionDetails"].get("text", "exception"))
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))

    def call(self, method, session=False, **params):
        import os

        self._next += 1
        msg = {"id": self._next, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, self._json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._messages.get(timeout=60)
            if reply.get("id") == self._next:
                assert "error" not in reply, (method, reply["error"])
                return reply.get("result", {})
            self._event(reply)

    def wait_for(self, method, timeout=60):
        import time

        end = time.monotonic() + timeout
        seen = len(self.events)
        while time.monotonic() < end:
            for ev in self.events[seen:]:
                if ev.get("method") == method:
                    return ev["params"]
            seen = len(self.events)
            try:
                self._event(self._messages.get(timeout=max(0.01, end - time.monotonic())))
            except Exception:  # noqa: BLE001 - queue.Empty: time is up
                break
        raise AssertionError(f"no {method} within {timeout} s")

    def open(self, url):
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")

    def reload(self):
        self.events.clear()
        self.call("Page.reload", session=True)
        self.wait_for("Page.loadEventFired")

    def js(self, expression):
        res = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in res, res
        return res["result"].get("value")

    def key(self, key, shift=False):
        codes = {"ArrowRight": ("ArrowRight", 39), "ArrowLeft": ("ArrowLeft", 37), "Escape": ("Escape", 27)}
        if key in codes:
            code, vk = codes[key]
        else:
            code, vk = (f"Key{key.upper()}" if key.isalpha() else f"Digit{key}"), ord(key.upper())
        base = {"key": key, "code": code, "windowsVirtualKeyCode": vk, "modifiers": 8 if shift else 0}
        text = {} if key in codes else {"text": key}
        self.call("Input.dispatchKeyEvent", session=True, type="keyDown", **base, **text)
        self.call("Input.dispatchKeyEvent", session=True, type="keyUp", **base)

    def screenshot(self, path):
        import base64

        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", session=True)["data"]))
        return path

    def close(self):
        import os

        try:
            self.call("Browser.close")
        except Exception:  # noqa: BLE001 - the browser may already be gone
            pass
        os.close(self._cmd_w)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _not_blank(path):
    a = np.asarray(Image.open(path).convert("RGB"))
    return len(np.unique(a.reshape(-1, 3), axis=0)) > 50


@pytest.mark.slow
def test_rater_session_keyboard_rating_round_trip(group_run, tmp_path):
    """Open the overview, filter to flagged, open a report, rate three scans with the
    keyboard only, reload, export, and feed the export to ``group --labels``."""
    import csv
    import shutil as sh

    from qc_pipeline.cli.app import main

    dv, _ = group_run
    root = tmp_path / "study"
    sh.copytree(dv.root, root)
    (tmp_path / "dl").mkdir()
    b = _Browser(tmp_path / "profile", tmp_path / "dl")
    try:
        b.open((root / "index.html").as_uri())
        assert b.js("document.getElementById('progress').textContent") == "0 of 18 rated"
        # filter to flagged: every card left is flagged
        b.js("var s = document.getElementById('ov-show'); s.value = 'flagged';"
             "s.dispatchEvent(new Event('change'))")
        shown = b.js("Array.from(document.querySelectorAll('article.card:not(.hidden)'))"
                     ".map(c => c.dataset.flagged + c.dataset.bidsName)")
        assert shown and all(s.startswith("1") for s in shown)
        assert _not_blank(b.screenshot(tmp_path / "overview.png"))
        # open the first flagged scan's report: it lands on that scan, which links back
        first = shown[0][1:]
        b.js("document.querySelector('article.card:not(.hidden) a.name').click()")
        b.wait_for("Page.loadEventFired")
        assert b.js("location.hash") == "#" + b.js(f"document.querySelector('section.scan[data-bids-name=\"{first}\"]').id")
        assert b.js("document.querySelector(location.hash + ' .scannav a').getAttribute('href')").startswith("group_T1w.html#row-")
        assert _not_blank(b.screenshot(tmp_path / "report.png"))
        b.open((root / "index.html").as_uri())
        b.js("var s = document.getElementById('ov-show'); s.value = ''; s.dispatchEvent(new Event('change'))")
        # type the rater's initials, then keyboard only
        b.js("document.getElementById('rater').focus()")
        for ch in "zz":
            b.key(ch)
        b.key("Escape")
        b.js("document.getElementById('rater').dispatchEvent(new Event('change'))")
        b.key("r")
        assert b.js("document.getElementById('rater-view').hidden") is False
        names = [b.js("document.getElementById('rv-name').textContent")]
        b.key("ArrowRight")  # unrated: a rater cannot skip it by accident
        assert b.js("document.getElementById('rv-name').textContent") == names[0]
        assert "Not rated yet" in b.js("document.getElementById('rv-message').textContent")
        b.key("3")
        b.key("g")  # ghosting/wrap-around
        b.key("m")  # motion
        b.key("ArrowRight")
        names.append(b.js("document.getElementById('rv-name').textContent"))
        b.key("1")
        b.key("ArrowRight")
        names.append(b.js("document.getElementById('rv-name').textContent"))
        b.key("2")
        assert len(set(names)) == 3
        assert b.js("document.getElementById('progress').textContent") == "3 of 18 rated"
        assert _not_blank(b.screenshot(tmp_path / "rating.png"))
        # ratings survive a reload
        b.reload()
        assert b.js("document.getElementById('progress').textContent") == "3 of 18 rated"
        b.js("var s = document.getElementById('ov-rated'); s.value = 'rated'; s.dispatchEvent(new Event('change'))")
        assert sorted(b.js("Array.from(document.querySelectorAll('article.card:not(.hidden)'))"
                           ".map(c => c.dataset.bidsName)")) == sorted(names)
        # export: a real download of the TSV
        b.js("document.getElementById('download-ratings').click()")
        done = b.wait_for("Browser.downloadProgress")
        while done.get("state") != "completed":
            done = b.wait_for("Browser.downloadProgress")
        assert b.errors == []
    finally:
        b.close()
    files = list((tmp_path / "dl").iterdir())
    assert len(files) == 1 and files[0].name.startswith("itermask-qc_ratings_zz_")
    with open(files[0], encoding="utf-8", newline="") as fh:
        rows = {r["bids_name"]: r for r in csv.DictReader(fh, delimiter="\t")}
    assert {n: rows[n]["rating"] for n in names} == dict(zip(names, ["bad", "good", "questionable"]))
    assert rows[names[0]]["artifacts"] == "motion;ghosting/wrap-around" or \
        set(rows[names[0]]["artifacts"].split(";")) == {"motion", "ghosting/wrap-around"}
    assert {r["rater"] for r in rows.values()} == {"zz"}
    # the export, and a second rater's file, read back by the group level
    raters = tmp_path / "raters"
    raters.mkdir()
    sh.copy(files[0], raters / files[0].name)
    (raters / "yy.tsv").write_text("bids_name\trating\tartifacts\nsub-02_T1w\tgood\t\n")
    assert main([str(dv.bids), str(root), "group", "--labels", str(raters)]) == 0
    with open(root / "group_T1w_sites.csv", encoding="utf-8", newline="") as fh:
        sites = {r["site"]: r for r in csv.DictReader(fh)}
    t1 = [n for n in names if n.endswith("_T1w")]
    labelled = [n for n, v in zip(names, ["bad", "good", "questionable"]) if v != "questionable" and n in t1]
    assert int(sites["ALL_SITES"]["n_labelled"]) == len(labelled) + ("sub-02_T1w" not in labelled)
    with open(root / "group_T1w.csv", encoding="utf-8", newline="") as fh:
        table = {r["bids_name"]: r for r in csv.DictReader(fh)}
    if names[0] in table:
        assert table[names[0]]["label"] == "1" and "motion" in table[names[0]]["rated_artifacts"]
    assert "labelled (artifact)" in (root / "group_T1w.html").read_text()


@pytest.mark.slow
def test_pages_fit_1400_px_and_plots_are_linked(group_run, tmp_path):
    """No page is wider than a 1400 px window; pointing at a dot marks that scan in every
    plot and in the table, and clicking it opens the scan's section of its report."""
    dv, _ = group_run
    b = _Browser(tmp_path / "profile", tmp_path)
    try:
        for page in ("group_T1w.html", "index.html", "sub-01.html"):
            b.open((dv.root / page).as_uri())
            assert b.js("document.documentElement.scrollWidth") <= 1400, page
        b.open((dv.root / "group_T1w.html").as_uri())
        n_plots = b.js("document.querySelectorAll('svg.strip').length")
        box = b.js("(() => { const d = document.querySelector('svg.strip circle.flag'); d.scrollIntoView();"
                   " const r = d.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2,"
                   " d.dataset.scan]; })()")
        b.call("Input.dispatchMouseEvent", session=True, type="mouseMoved", x=box[0], y=box[1])
        marked = b.js("Array.from(document.querySelectorAll('svg.strip .hl')).map(d => d.dataset.scan)")
        assert marked == [box[2]] * n_plots
        assert b.js("document.querySelector('table.ranking tr.hl').dataset.bidsName") == box[2]
        assert b.js("document.getElementById('plot-highlight').textContent") == box[2]
        for kind in ("mousePressed", "mouseReleased"):
            b.call("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1], button="left",
                   clickCount=1)
        b.wait_for("Page.loadEventFired")
        anchor = b.js("location.hash").lstrip("#")
        assert b.js(f"document.getElementById('{anchor}').dataset.bidsName") == box[2]
        assert b.errors == []
    finally:
        b.close()
