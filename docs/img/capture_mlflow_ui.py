"""The MLflow UI screenshots of docs/tracking.md, taken from a demo's store.

    python docs/img/capture_mlflow_ui.py PROJECT_DIR [--out docs/img] [--chromium /usr/bin/chromium]

PROJECT_DIR is where ``make demo`` (``pipelines/demo.py``) ran: it holds ``mlflow.db`` and ``mlartifacts``.
Starts ``mlflow ui`` there (on 127.0.0.1, a free port) and a headless Chromium, drives the browser through
its DevTools protocol (each page opened with ``?workflowType=machine_learning``, the "MLflow Assistant"
panel closed) and writes ``mlflow_*.png``, 1600 px wide, into --out. Uses the newest ``demo-*`` parent run
of the ``spot-demo`` experiment.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import websocket
from mlflow import MlflowClient

from pipelines.utils.ports import free_ports

WIDTH = 1600
VIEW = "workflowType=machine_learning"  # the UI's model-training view (docs/tracking.md)

# page helpers, defined once per page load: elements by their visible text, the Assistant's close button
HELPERS = """
window.shot = {
  visible: e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; },
  byText: (selector, text) => [...document.querySelectorAll(selector)]
      .filter(e => shot.visible(e) && e.textContent.trim() === text),
  has: text => document.body.innerText.includes(text),
  leaf: prefix => [...document.querySelectorAll('body *')]
      .find(e => e.children.length === 0 && shot.visible(e) && e.textContent.trim().startsWith(prefix)),
  deepest: pattern => [...document.querySelectorAll('body *')]
      .filter(e => shot.visible(e) && pattern.test(e.textContent.trim())).pop(),
  closeAssistant: () => {
    const close = document.querySelector('button[data-component-id="mlflow.assistant.chat_panel.close"]');
    if (close) close.click();
    return !!close;
  },
};
true
"""


def wait_http(url: str, timeout: float = 120) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Browser:
    """One headless Chromium tab, driven through the DevTools protocol."""

    def __init__(self, ws_url: str):
        self.ws = websocket.create_connection(ws_url, timeout=120, suppress_origin=True)
        self.last_id = 0

    def call(self, method: str, **params) -> dict:
        self.last_id += 1
        self.ws.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:  # events of enabled domains come in between; skip them
            message = json.loads(self.ws.recv())
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}")
            time.sleep(0.5)

    def open(self, url: str, text: str, height: int = 1000) -> None:
        """Load ``url`` in a 1600 x ``height`` window, wait for ``text`` on the page, close the Assistant."""
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1,
                  mobile=False)
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && !!document.body", f"{url} to load")
        self.js(HELPERS)
        self.wait(f"shot.has({json.dumps(text)})", f"{text!r} on {url}")
        if self.js("shot.closeAssistant()"):
            self.wait("!document.querySelector('[data-component-id^=\"mlflow.assistant.chat_panel\"]')",
                      "the Assistant panel to close", 10)
        self.settle()

    def settle(self, seconds: float = 4) -> None:
        time.sleep(seconds)  # charts and tables finish drawing after their data arrived

    def save(self, path: Path) -> None:
        shot = self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"wrote {path}")


def demo_ids(client: MlflowClient) -> dict:
    """The experiment id, the newest demo's run ids and names, its dense run's logged and registered model."""
    experiment = client.get_experiment_by_name("spot-demo")
    if experiment is None:
        raise SystemExit("capture_mlflow_ui: no 'spot-demo' experiment in the store (run pipelines/demo.py)")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.info.run_name.split("-2")[0]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    dense = children["demo-dense"]
    version = client.search_model_versions(f"run_id = '{dense.info.run_id}'")[0]  # source: models:/<id>
    return {"experiment": experiment.experiment_id, "parent": parent.info.run_name,
            "dense": dense.info.run_id, "dense_name": dense.info.run_name,
            "spot": children["demo-spot"].info.run_id,
            "spot_epochs": int(children["demo-spot"].data.params["epochs"]),
            "compare": children["compare-selectors"].info.run_id,
            "model": version.source.removeprefix("models:/"), "registered": (version.name, version.version)}


def capture(browser: Browser, base: str, ids: dict, out: Path) -> None:
    experiment = f"{base}/#/experiments/{ids['experiment']}"
    dense = f"{experiment}/runs/{ids['dense']}"
    child_shown = f"shot.has({json.dumps(ids['dense_name'])})"

    browser.open(f"{experiment}?{VIEW}", ids["parent"])
    if not browser.js(child_shown):
        browser.js("document.querySelector('button[data-component-id*=runnamecellrenderer]').click()")
        browser.wait(child_shown, "the parent run to expand")
        browser.settle()
    browser.save(out / "mlflow_experiment.png")

    browser.open(f"{dense}/model-metrics?{VIEW}", "val_acc1")
    browser.save(out / "mlflow_run_charts.png")

    browser.open(f"{dense}/system-metrics?{VIEW}", "system/cpu_utilization_percentage")
    browser.save(out / "mlflow_system_metrics.png")

    # the chart view's image card shows MLflow's 63 x 256 px thumbnail; the Artifacts tab the figure itself
    browser.open(f"{experiment}/runs/{ids['spot']}/artifacts?{VIEW}", "evaluation.md", height=1400)
    browser.js("shot.byText('span, div', 'images').pop().click()")
    last_step = rf"/^token_masks\+step\+{ids['spot_epochs'] - 1}\+[^ ]*[0-9a-f]\.png$/"
    browser.wait(f"!!shot.deepest({last_step})", "the token-mask figures")
    browser.js(f"shot.deepest({last_step}).click()")
    browser.wait("[...document.images].some(i => i.naturalHeight > 500)", "the token-mask figure")
    browser.settle()
    browser.save(out / "mlflow_token_mask_images.png")

    browser.open(f"{dense}?{VIEW}", "cluttered-digits-train", height=1300)
    browser.save(out / "mlflow_dataset.png")
    browser.js("shot.leaf('cluttered-digits-train').click()")
    browser.wait("shot.has('Data details')", "the dataset's details")
    browser.settle()
    browser.save(out / "mlflow_dataset_details.png")

    # the tags table scrolls within 280 px (5 rows); unrolled so that the picture holds every tag
    name, version = ids["registered"]
    browser.open(f"{base}/#/models/{name}/versions/{version}?{VIEW}", "val_acc5", height=1200)
    browser.js("shot.leaf('val_acc5').closest('.du-bois-light-table-body').style.maxHeight = 'none'")
    browser.settle(1)
    browser.save(out / "mlflow_registered_model.png")

    browser.open(f"{experiment}/models/{ids['model']}?{VIEW}", "Model versions", height=1200)
    browser.save(out / "mlflow_logged_model.png")

    browser.open(f"{experiment}/runs/{ids['compare']}?{VIEW}", "compare-selectors", height=1300)
    browser.save(out / "mlflow_comparison_run.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", type=Path, help="holds the demo's mlflow.db, mlartifacts")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="[default: docs/img]")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    project = args.project.resolve()
    if not (project / "mlflow.db").is_file():
        print(f"capture_mlflow_ui: no mlflow.db in {project}", file=sys.stderr)
        return 2
    ids = demo_ids(MlflowClient(f"sqlite:///{project / 'mlflow.db'}"))
    ui_port, devtools_port = free_ports(2)
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    with tempfile.TemporaryDirectory() as profile:
        server = subprocess.Popen([mlflow_cli, "ui", "--backend-store-uri", "sqlite:///mlflow.db",
                                   "--host", "127.0.0.1", "--port", str(ui_port)],
                                  cwd=project, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        chromium = subprocess.Popen([args.chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                     "--hide-scrollbars", f"--window-size={WIDTH},1000",
                                     f"--remote-debugging-port={devtools_port}", f"--user-data-dir={profile}",
                                     "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{ui_port}"
            wait_http(f"{base}/health")
            targets = json.loads(wait_http(f"http://127.0.0.1:{devtools_port}/json/list"))
            page = next(t for t in targets if t["type"] == "page")
            browser = Browser(page["webSocketDebuggerUrl"])
            browser.call("Page.enable")
            args.out.mkdir(parents=True, exist_ok=True)
            capture(browser, base, ids, args.out)
        finally:
            chromium.kill()
            chromium.wait()
            os.killpg(server.pid, signal.SIGTERM)  # the server and its workers (their own session)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
