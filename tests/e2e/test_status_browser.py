"""The status page in a real browser (headless Debian Chromium).

`--dump-dom` shows what a browser builds from the page (a revoked node reads revoked, the
banner appears when the artifact set is broken); a WebDriver session (chromedriver, spoken
to with urllib) waits for the page's script to pick up a mode change and a revocation
without a reload. Screenshots stay under the test's tmp dir (`status-*.png`).
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server_support import (  # noqa: F401 - fixtures
    enroll,
    running_fixture,
    server_env_fixture,
)

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed "
                                "(scripts/setup installs it from scripts/apt-packages.txt)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1400,1000"]
A, B, C = "dc:a6:32:aa:bb:cc", "dc:a6:32:00:00:01", "dc:a6:32:00:00:02"
WAIT = 120.0  # a generous ceiling for the page's 2 s polling on a loaded machine


def _chromium(tmp: Path, *args: str) -> str:
    profile = tmp / f"profile-{time.monotonic_ns()}"
    done = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _dom(tmp: Path, url: str) -> str:
    return _chromium(tmp, "--dump-dom", url)


def _screenshot(tmp: Path, url: str, name: str) -> Path:
    png = tmp / name
    _chromium(tmp, f"--screenshot={png}", url)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return png


def _row(dom: str, mac12: str) -> str:
    start = dom.index(f'data-node="{mac12}"')
    return dom[dom.rindex("<tr", 0, start):dom.index("</tr>", start)]


@pytest.fixture
def site(running: Any) -> Any:
    for mac in (A, B):
        assert enroll(running.port, mac).status == 201
    running.service.set_label(A, "rack1-pi")
    running.service.revoke(B)
    return running


def test_dom_shows_revoked_node_label_and_build(site: Any, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{site.admin_port}/"
    dom = _dom(tmp_path, url)
    revoked = _row(dom, "dca632000001")
    assert 'class="revoked"' in revoked and ">revoked</span>" in revoked
    assert "revoked: none served" in revoked
    labelled = _row(dom, "dca632aabbcc")
    assert ">rack1-pi</a>" in labelled and ">enrolled</span>" in labelled
    assert "never fetched: will flash" in labelled and "site default" in labelled
    assert 'id="banner"' not in dom
    assert "1700000000 (2023-11-14 22:13:20 UTC)" in dom  # SOURCE_DATE_EPOCH with its date
    assert "3.1 MB" in dom  # human sizes
    assert "sha256:" in dom  # the boot key fingerprint
    node_dom = _dom(tmp_path, f"{url}nodes/dca632aabbcc")
    assert 'data-page="node"' in node_dom and "dc:a6:32:aa:bb:cc" in node_dom
    png = _screenshot(tmp_path, url, "status-nodes.png")
    assert png.stat().st_size > 20_000
    _screenshot(tmp_path, f"{url}nodes/dca632aabbcc", "status-node-page.png")


def test_banner_when_artifacts_missing_or_changed(site: Any, server_env: dict[str, Path],
                                                  tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{site.admin_port}/"
    out = server_env["artifacts"]
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"] = {"bootimg/boot.img": {"sha256": "0" * 64, "size": 1},
                             "recovery/rpi-5-sd-recovery.tar.gz": {"sha256": "1" * 64,
                                                                   "size": 2}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    dom = _dom(tmp_path, url)
    banner = dom[dom.index('id="banner"'):dom.index("</div>", dom.index('id="banner"'))]
    assert "bootimg/boot.img: does not match manifest.json" in banner
    assert "recovery/rpi-5-sd-recovery.tar.gz: listed in manifest.json but missing" in banner
    (out / "bootimg" / "boot.img").unlink()
    dom = _dom(tmp_path, url)
    assert "boot.img: missing" in dom or "boot.img is not in the artifact set" in dom
    _screenshot(tmp_path, url, "status-banner.png")


# -- WebDriver: the page refreshes itself --------------------------------------------------
class WebDriver:
    """The few W3C WebDriver calls the test needs (chromedriver on loopback)."""

    def __init__(self, tmp: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log = open(tmp / "chromedriver.log", "wb")  # noqa: SIM115 - closed in quit()
        self.proc = subprocess.Popen([str(CHROMEDRIVER), f"--port={self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                if self._call("GET", "/status")["value"]["ready"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "chromedriver did not start"
            time.sleep(0.2)
        caps = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM, "args": FLAGS + [f"--user-data-dir={tmp / 'wd-profile'}"]}}
        reply = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
        self.session = f"/session/{reply['value']['sessionId']}"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=WAIT) as resp:
            return json.loads(resp.read())

    def get(self, url: str) -> None:
        self._call("POST", f"{self.session}/url", {"url": url})

    def js(self, script: str) -> Any:
        return self._call("POST", f"{self.session}/execute/sync",
                          {"script": script, "args": []})["value"]

    def wait_for(self, script: str) -> Any:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            value = self.js(script)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"never true in the page: {script}")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._call("GET", f"{self.session}/screenshot")["value"]))

    def quit(self) -> None:
        try:
            self._call("DELETE", self.session)
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=60)
            self.log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    if CHROMEDRIVER is None:
        pytest.skip("chromium-driver not installed (scripts/apt-packages.txt)")
    driver = WebDriver(tmp_path)
    try:
        yield driver
    finally:
        driver.quit()


def _cell(mac12: str, key: str) -> str:
    return (f"var r = document.querySelector('[data-node=\"{mac12}\"] [data-k=\"{key}\"]');"
            " return r ? r.textContent : null;")


def test_page_refreshes_without_reload(site: Any, browser: WebDriver, tmp_path: Path) -> None:
    browser.get(f"http://127.0.0.1:{site.admin_port}/")
    assert browser.js(_cell("dca632aabbcc", "mode")) == "enforced"
    browser.js("window.fwbuildNoReload = 'kept'; return null;")  # gone if the page reloads
    site.service.set_mode(A, "permissive")
    browser.wait_for("var r = document.querySelector('[data-node=\"dca632aabbcc\"] "
                     "[data-k=\"mode\"]'); return r && r.textContent === 'permissive';")
    assert browser.js(_cell("dca632aabbcc", "mode_source")) == "override"
    site.service.revoke(A)
    browser.wait_for("var r = document.querySelector('tr[data-node=\"dca632aabbcc\"]');"
                     " return r && r.classList.contains('revoked');")
    assert browser.js(_cell("dca632aabbcc", "state")) == "revoked"
    assert enroll(site.port, C).status == 201  # a new node: the table is swapped in place
    browser.wait_for("return !!document.querySelector('[data-node=\"dca632000002\"]');")
    assert browser.js("return window.fwbuildNoReload || null;") == "kept"
    browser.screenshot(tmp_path / "status-refreshed.png")
    assert (tmp_path / "status-refreshed.png").read_bytes()[:4] == b"\x89PNG"
