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


@pytest.mark.parametrize("page", ["sub-01.html", "group_T1w.html"])
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
