"""The README's picture of a search's runs compared in MLflow: a tiny search (the tests' tiny model
on the toy world, three trials of ten iterations: the figures are no result), served by
`splitmatch ui`, its trials in MLflow's runs table, rendered by headless Chromium (Debian's
package).

    .venv/bin/python docs/screenshots/mlflow_search.py [--store DIR]

writes docs/screenshots/mlflow_search.png. With --store, the search is run in DIR once and reused
by later calls (to adjust the picture without training again).
"""
import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))  # the tiny config the tests train

from helpers import search_config  # noqa: E402

SPACE = {"model.num_candidate_queries": {"grid": [0, 2, 4]}}
# The window; the picture leaves out MLflow's assistant panel, the window's right 645 pixels.
WIDTH, HEIGHT, ASSISTANT = 2500, 440, 645


def run_search(store: Path) -> None:
    if (store / "runs" / "mlflow.db").is_file():
        return
    import yaml

    config = search_config(store, SPACE)
    data = yaml.safe_load(config.read_text())
    data["train"].update(max_iters=10, eval_every=10, checkpoint_every=10)  # some figures
    config.write_text(yaml.safe_dump(data))
    subprocess.run([sys.executable, "-m", "splitmatch.cli", "tune", str(config)], check=True)


def screenshot(url: str, out: Path, profile: Path) -> None:
    from PIL import Image

    subprocess.run([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", "--virtual-time-budget=20000",
                    f"--window-size={WIDTH},{HEIGHT}", f"--user-data-dir={profile}",
                    f"--screenshot={out}", url], check=True, capture_output=True, timeout=180)
    Image.open(out).crop((0, 0, WIDTH - ASSISTANT, HEIGHT)).save(out, optimize=True)


def main() -> None:
    from mlflow.tracking import MlflowClient

    from splitmatch.network import free_port
    from splitmatch.tracking import RUNS_VIEW_COLUMNS, runs_view_url

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None)
    args = parser.parse_args()
    store = args.store or Path(tempfile.mkdtemp(prefix="mlflow-search-"))
    store.mkdir(parents=True, exist_ok=True)
    run_search(store)
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "splitmatch.cli", "ui", "--storage-path",
                           str(store / "runs"), "--port", str(port)], stdout=subprocess.PIPE,
                          text=True)
    try:
        lines = [ui.stdout.readline() for _ in range(2)]
        print("".join(lines), end="")
        client = MlflowClient(f"http://127.0.0.1:{port}")
        experiment = client.get_experiment_by_name("search").experiment_id
        # The splitmatch runs view (`splitmatch ui` links it) with the search's trials at the top
        # level (the table shows a parent's runs folded) and the searched value as a column:
        # a view saved in the store as MLflow's UI saves them.
        [parent] = [run.info.run_id for run in client.search_runs([experiment])
                    if "mlflow.parentRunId" not in run.data.tags]
        state = {"selectedColumns": RUNS_VIEW_COLUMNS + [f"params.`{key}`" for key in SPACE],
                 "searchFilter": f"tags.mlflow.parentRunId = '{parent}'",
                 "orderByKey": "tags.`mlflow.runName`", "orderByAsc": True}
        now = int(time.time() * 1000)
        client.set_experiment_tag(experiment, "mlflow.sharedViewState.trials", json.dumps(
            {"name": "trials", "createdAt": now, "updatedAt": now, "state": json.dumps(state)}))
        url = runs_view_url(f"http://127.0.0.1:{port}", experiment, view="trials")
        screenshot(url, HERE / "mlflow_search.png", store / "chromium")
        print(f"wrote {HERE / 'mlflow_search.png'} ({url})")
    finally:
        ui.send_signal(signal.SIGINT)
        ui.wait(timeout=60)


if __name__ == "__main__":
    main()
