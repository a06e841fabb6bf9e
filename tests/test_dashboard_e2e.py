"""The Ray dashboard as a researcher opens it during a study: msx says where the token is (never the token), the
study's Train runs carry its trials' names, and headless Chromium, given the token as the dashboard's login cookie,
finds the study there. The screenshot is kept in test-artifacts/ (look at it).

A Ray head with token authentication (its token in a file of this test, not the user's ~/.ray) runs a tiny study
driven by `msx launch --address`; the head outlives the driver, as a researcher's cluster does.
"""

import asyncio
import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from msx.orchestrator.trial import TrialConfig
from msx.orchestrator.trials.trainable import train_run_name, trial_id_of_train_run
from tests.helpers import REPOSITORY, free_port, ray_head_session, stop_ray_session, tiny_spec

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPOSITORY / "test-artifacts"
COOKIE = "ray-authentication-token"  # the dashboard's own login cookie (ray._private.authentication)
SPEC = tiny_spec(
    "dash",
    data={
        "modalities": ["flair", "t2"], "folds": "loso", "synthetic": {"patients": 3, "shape": [32, 36, 32], "seed": 0}
    },
    resources={"workers_per_trial": 1, "cpus_per_worker": 1},
    search={"configurations_per_backbone": 1, "scheduler": {"name": "fifo"}},
    registry={"model_name": "msx-dash"},
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A Ray head with token authentication, and a finished tiny study driven against it: (stdout, dashboard URL,
    token, token file, environment)."""
    folder = tmp_path_factory.mktemp("dashboard")
    token = secrets.token_hex(32)
    token_file = folder / "ray_token"
    token_file.write_text(token)
    environment = {
        **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN")},
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    gcs_port, dashboard_port = free_port(), free_port()
    subprocess.run(
        [BIN / "ray", "start", "--head", f"--port={gcs_port}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
         f"--metrics-export-port={free_port()}", "--disable-usage-stats"],
        env=environment, check=True, capture_output=True, timeout=180,
    )
    session = ray_head_session(gcs_port)
    try:
        (folder / "dash.yaml").write_text(yaml.safe_dump(SPEC))
        launch = subprocess.run(
            [BIN / "msx", "launch", "--space", "dash.yaml", "--address", f"127.0.0.1:{gcs_port}", "--storage", "runs"],
            cwd=folder, env=environment, capture_output=True, text=True, timeout=1500,
        )
        print(launch.stdout[-4000:])
        assert launch.returncode == 0, launch.stderr[-3000:]
        yield launch.stdout, f"http://127.0.0.1:{dashboard_port}", token, token_file
    finally:
        stop_ray_session(session, gcs_port)


def test_msx_says_where_the_token_is_and_never_prints_it(study):
    stdout, dashboard, token, token_file = study
    assert dashboard in stdout
    assert (
        f"the dashboard asks for Ray's token: paste the output of `ray get-auth-token` (the file {token_file})"
        in stdout
    )
    assert token not in stdout


class Browser:
    """Headless Chromium driven over the DevTools protocol (the only way to hand a page a cookie)."""

    def __init__(self, socket):
        self._socket = socket
        self._next = 0

    async def call(self, method: str, **params):
        self._next += 1
        await self._socket.send_json({"id": self._next, "method": method, "params": params})
        while True:
            message = await self._socket.receive_json(timeout=120)
            if message.get("id") == self._next:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    async def text_once(self, url: str, wanted, timeout_s: float = 90) -> str:
        """Open ``url`` and wait until the page's text satisfies ``wanted``; the text at the deadline otherwise."""
        await self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        text = ""
        while time.monotonic() < deadline:
            await asyncio.sleep(1)
            result = await self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''")
            text = result["result"].get("value", "")
            if wanted(text):
                break
        return text

    async def screenshot(self, path: Path) -> None:
        await self.call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
        await asyncio.sleep(2)  # the page lays itself out again at the new size
        path.write_bytes(base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"]))


async def _inspect_dashboard(dashboard: str, token: str, profile: Path, shot: Path) -> dict[str, str]:
    import aiohttp

    port = free_port()
    chromium = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
         "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(60):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/json/list") as answer:
                        pages = [t for t in await answer.json() if t["type"] == "page"]
                    if pages:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(1)
            async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=64 * 2**20) as socket:
                browser = Browser(socket)
                await browser.call("Page.enable")
                await browser.call("Network.enable")
                seen = {
                    "without token": await browser.text_once(
                        f"{dashboard}/api/train/v2/runs/v1", lambda text: bool(text)
                    )
                }
                await browser.call("Network.setCookie", name=COOKIE, value=token, url=dashboard, path="/")
                seen["train runs"] = await browser.text_once(
                    f"{dashboard}/api/train/v2/runs/v1", lambda text: text.lstrip().startswith("{")
                )
                seen["jobs"] = await browser.text_once(f"{dashboard}/#/jobs", lambda text: "msx launch" in text)
                await browser.screenshot(shot)
                return seen
    finally:
        chromium.terminate()
        chromium.wait(timeout=30)


@pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (`make browser` installs it where apt-get runs as root)"
)
def test_the_dashboard_shows_the_study_to_a_browser_with_the_token(study, tmp_path):
    _, dashboard, token, _ = study
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "ray-dashboard-jobs.png"
    seen = asyncio.run(_inspect_dashboard(dashboard, token, tmp_path / "profile", shot))

    assert "Missing authentication token" in seen["without token"]
    runs = json.loads(seen["train runs"])["train_runs"]
    # One Train run per trial, named after it (label and Tune trial id), as the study's MLflow runs are.
    names = sorted(run["name"] for run in runs)
    (backbone,) = SPEC["model"]["backbones"]
    assert names == [train_run_name(TrialConfig(backbone, fold, f"{backbone}-c1"), trial_id_of_train_run(name))
                     for fold, name in zip((1, 2, 3), names, strict=False)], names
    assert {run["status"] for run in runs} == {"FINISHED"}, runs
    # The Jobs view lists the study's driver, `msx launch ...`.
    assert "msx launch" in seen["jobs"], seen["jobs"][:2000]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
