"""Regenerate the MLflow UI screenshots in docs/img/ (docs/mlflow.md): a small two-iteration digits run logged
to a real `mlflow server` on loopback, photographed by headless Chromium.

  apt-get install -y chromium          # Debian's package; the script looks for chromium on PATH
  .venv/bin/python docs/screenshots.py               # the run takes 5-15 min on 2 shared cores
  .venv/bin/python docs/screenshots.py --keep-open   # then browse the same UI yourself (Ctrl-C stops it)

The run is the demo's pipeline (pipelines/digits.yaml) shrunk by OVERRIDES so it finishes in minutes; the
pictures show the UI's structure (runs, lineage, plots), not the demo's FIDs. Running it again reuses the
finished run under --out (every stage is skipped) and only retakes the pictures.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sims_platform.config import load_config  # noqa: E402
from sims_platform.launch.servers import free_port, mlflow_server  # noqa: E402

PIPELINE = REPO / "pipelines" / "digits.yaml"
# The demo's pipeline, two iterations (the second trains on real + fed-forward samples), everything smaller.
OVERRIDES = [
    "iterations.count=2", "iterations.train_data=real+synthetic", "iterations.feed_samples=200",
    "train_base.images=4000", "train_base.checkpoint_images=2000", "train_base.log_images=500",
    "finetune_aux.images=1000", "finetune_aux.checkpoint_images=500", "finetune_aux.log_images=250",
    "generate.num_samples=200", "generate.batch_size=100", "generate.shard_size=100", "generate.sampler.steps=4",
    "evaluate.num_samples=200", "evaluate.batch_size=100", "evaluate.repeats=1",
    "evaluate.methods=[{name: sims, weights: [0.5, 1.0]}, {name: neon, weights: [0.5]}]",
    "evaluate.sampler.steps=4",
]
WIDTH = 1440
MAX_BYTES = 300_000
# Browser state set before each page loads (MLflow keeps it in localStorage, keys "<key>_v<version>"): the
# sidebar on "Model training", and the assistant panel (auto-opened on a first visit from 127.0.0.1) closed.
LOCAL_STORAGE = {"mlflow.workflowType_v1": '"machine_learning"', "mlflow.assistant.panelOpen_v1": "false",
                 "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true"}
# JS: the innermost elements whose text is exactly t (headings, labels), in document order.
LEAF_BY_TEXT = ("(t => Array.from(document.querySelectorAll('body *')).filter(x => x.textContent.trim() === t "
                "&& !Array.from(x.children).some(c => c.textContent.trim() === t)))")
SUMMARY_COLUMNS = ("fid_base", "fid_best", "best_w")
# The runs table's expander buttons (+ when collapsed, - when expanded) in the run-name cells.
EXPANDER = 'button[data-component-id$="runnamecellrenderer.tsx_46"]'
COLLAPSED_ICON = "M7.25 7.25V4.5"


def run_demo(out: Path, url: str) -> dict:
    """Run (or find complete) the shrunk demo against the server; returns ids for the pictures."""
    from mlflow import MlflowClient

    from sims_platform.pipeline.runner import run_pipeline

    root = out / "run"
    cfg = load_config(PIPELINE, [*OVERRIDES, f"storage.root={root}", f"tracking.uri={url}"])
    run_pipeline(cfg)
    client = MlflowClient(url)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    found = client.search_runs([exp.experiment_id], f"tags.`sims.storage_root` = '{root.as_uri()}'", max_results=500)
    return {"experiment": exp.experiment_id, "runs": {r.info.run_name: r.info.run_id for r in found},
            "name": cfg.name}


class Browser:
    """Headless Chromium driven over the DevTools protocol: set state, open a route, wait for text, shoot."""

    def __init__(self, chromium: str, profile: str, height: int = 900):
        import websocket  # websocket-client (a kubernetes dependency)

        self.port = free_port()
        self.proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      "--no-first-run", f"--user-data-dir={profile}",
                                      f"--remote-debugging-port={self.port}", "--remote-allow-origins=*",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
                    page = next(t for t in json.load(r) if t["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.monotonic() > deadline:
                    raise TimeoutError("chromium did not open its DevTools port") from None
                time.sleep(0.3)
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120)
        self.n = 0
        self.call("Page.enable")  # without it, scripts added below do not run on new documents
        self.store(LOCAL_STORAGE)
        self.resize(height)

    def store(self, items: dict[str, str]) -> None:
        """Put these localStorage items in place before any page script runs (on every later navigation)."""
        state = "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in items.items())
        self.call("Page.addScriptToEvaluateOnNewDocument", source=state)

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expr: str):
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

    def resize(self, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1,
                  mobile=False)

    def open(self, url: str, text: str, timeout: float = 60) -> None:
        """Navigate and wait until the page shows `text` (the app renders after its API calls return)."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not self.js(f"document.body && document.body.innerText.includes({json.dumps(text)})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: {text!r} did not appear within {timeout:.0f} s")
            time.sleep(0.5)
        time.sleep(2)  # charts and images finish drawing

    def expand_all_runs(self) -> None:
        """Click the runs table's expanders until every parent run shows its children."""
        click = (f"(() => {{ const b = Array.from(document.querySelectorAll({json.dumps(EXPANDER)})).filter(x => "
                 f"x.querySelector('path').getAttribute('d').startsWith({json.dumps(COLLAPSED_ICON)})); "
                 f"if (b.length) b[0].click(); return b.length; }})()")
        for _ in range(50):
            if not self.js(click):
                return
            time.sleep(1.5)

    def shot(self, box: tuple[int, int, int, int] | None = None) -> Image.Image:
        import base64

        params = {"format": "png"}
        if box:
            x, y, w, h = box
            params["clip"] = {"x": x, "y": y, "width": w, "height": h, "scale": 1}
        return Image.open(io.BytesIO(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(30)


def save(img: Image.Image, dest: Path) -> None:
    """A palette PNG, shrunk until it is under MAX_BYTES."""
    img, scale = img.convert("RGB"), 1.0
    while True:
        out = img if scale == 1.0 else img.resize((int(img.width * scale), int(img.height * scale)), Image.LANCZOS)
        buf = io.BytesIO()
        out.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() <= MAX_BYTES or scale < 0.5:
            break
        scale *= 0.85
    dest.write_bytes(buf.getvalue())
    print(f"{dest}: {out.width}x{out.height}, {buf.tell() // 1000} KB", flush=True)


def take_pictures(b: Browser, base: str, ids: dict, img: Path, only: list[str] | None) -> None:
    exp, runs, name = ids["experiment"], ids["runs"], ids["name"]
    want = lambda picture: not only or picture in only  # noqa: E731

    if want("mlflow-runs-table"):  # the nested run tree with the summary metrics as columns
        b.resize(720)
        # The table's columns and expanded rows are the experiment page's saved state (localStorage).
        table = {"selectedColumns": ["attributes.`Dataset`", *(f"metrics.`{m}`" for m in SUMMARY_COLUMNS)],
                 "runsExpanded": {runs[n]: True for n in (name, "iter-0", "iter-1")}}
        b.store({f'MLflowLocalStorage-1.1-ExperimentPage-["{exp}"]-ReactComponentState': json.dumps(table)})
        b.open(f"{base}/#/experiments/{exp}/runs", name)
        b.expand_all_runs()
        save(b.shot(), img / "mlflow-runs-table.png")

    if want("mlflow-stage-lineage"):  # a stage run: its datasets (inputs) and sims.input/output tags
        b.resize(900)
        b.open(f"{base}/#/experiments/{exp}/runs/{runs['iter-1/train-base']}", "Datasets")
        save(b.shot(), img / "mlflow-stage-lineage.png")

    if want("mlflow-fid-vs-w"):  # the pipeline run's artifacts: FID vs w of every iteration
        b.resize(640)
        b.open(f"{base}/#/experiments/{exp}/runs/{runs[name]}/artifacts/fid_vs_w.png", "fid_vs_w.png")
        save(b.shot(), img / "mlflow-fid-vs-w.png")

    if want("mlflow-compare-iterations"):  # iter-0 next to iter-1: their summary metrics side by side
        b.resize(1600)
        query = urllib.parse.urlencode({"runs": json.dumps([runs["iter-0"], runs["iter-1"]]),
                                        "experiments": json.dumps([exp])})
        b.open(f"{base}/#/compare-runs?{query}", "Run details")
        # From the "Run details" heading to the one after "Metrics": names, times, then the metrics side by side.
        top = b.js(f"{LEAF_BY_TEXT}('Run details')[0].getBoundingClientRect().top")
        bottom = b.js(f"{LEAF_BY_TEXT}('Artifacts').pop().getBoundingClientRect().top")
        left = b.js(f"{LEAF_BY_TEXT}('Run details')[0].getBoundingClientRect().left")
        left = max(0, int(left) - 16)
        save(b.shot((left, int(top) - 12, WIDTH - left, int(bottom - top))), img / "mlflow-compare-iterations.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "out" / "screenshots"), help="run folder and MLflow store")
    parser.add_argument("--img", default=str(REPO / "docs" / "img"), help="where the PNGs go")
    parser.add_argument("--only", action="append", help="retake only this picture (repeatable)")
    parser.add_argument("--keep-open", action="store_true", help="keep the UI running after the pictures")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: chromium not found on PATH: apt-get install -y chromium", file=sys.stderr)
        return 2
    out, img = Path(args.out).resolve(), Path(args.img).resolve()
    out.mkdir(parents=True, exist_ok=True)
    img.mkdir(parents=True, exist_ok=True)
    with mlflow_server(out, (out / "artifacts").as_uri()) as url:
        ids = run_demo(out, url)
        with tempfile.TemporaryDirectory() as profile:
            browser = Browser(chromium, profile)
            try:
                take_pictures(browser, url, ids, img, args.only)
            finally:
                browser.close()
        if args.keep_open:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on `kill` too
            print(f"MLflow UI: {url}/#/experiments/{ids['experiment']}/runs (Ctrl-C stops it)", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
