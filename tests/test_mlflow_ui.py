"""A finished run as its users see it in MLflow: the real MLflow UI that `splitmatch ui` serves,
rendered by headless Chromium (Debian's package), with the run's figures, datasets, source,
system metrics and logged model where MLflow shows them."""
import html
import re
import shutil
import signal
import subprocess
import sys

import pytest

from helpers import ctrl_c_reaches_it, the_run
from splitmatch.network import free_port
from splitmatch.tracking import default_tracking_uri


def rendered_text(url: str, out_dir, width: int = 2400) -> str:
    """The text of a page of MLflow's single-page app once its requests are answered. Wide: the
    runs table renders only the columns in view."""
    chromium = shutil.which("chromium")
    assert chromium, "the browser check needs Chromium: apt-get install chromium"
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=20000", f"--window-size={width},1000",
                          f"--user-data-dir={out_dir / 'chromium'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180).stdout
    text = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    return " ".join(word for word in text.split() if not re.fullmatch(r"#[0-9a-f]{6}", word))


@pytest.mark.slow
def test_a_finished_run_shows_its_figures_dataset_and_model_in_the_mlflow_ui(tmp_path,
                                                                             finished_run):
    # The session's run "two" (chosen on "val"), in a copy of its runs folder: the server keeps
    # its log there, and the session's run is only read.
    runs = shutil.copytree(finished_run.runs, tmp_path / "runs")
    client, run = the_run(default_tracking_uri(runs))
    cache_key = run.data.tags["pseudo_cache_key"]

    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "splitmatch.cli", "ui", "--storage-path",
                           str(runs), "--port", str(port)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_reaches_it)
    try:
        assert ui.stdout.readline().startswith(f"MLflow UI for {runs}: ")
        line = ui.stdout.readline()
        assert line.startswith("  experiment 'tests', runs with hIoU, sIoU, uIoU: "), line
        runs_url = line.split(": ", 1)[1].strip()
        # The experiment opens in MLflow's model-training view: its runs table (not GenAI's
        # traces overview), in the view with the figures as columns.
        table = rendered_text(runs_url, tmp_path)
        assert "Model training" in table and "Traces 0" not in table, table[:3000]
        header = table[table.index("Run Name"):table.index("Hide run")]
        for column in ("Dataset", "Source", "Models", "hIoU", "sIoU", "uIoU"):
            assert column in header, (column, header)
        row = table[table.index("Hide run"):]  # the one run's row, after its buttons
        assert row.startswith("Hide run Pin run two "), row
        assert f"toyworld-train ({cache_key}) training" in row
        assert "splitmatch train" in row and "model" in row
        for key in ("hIoU", "sIoU", "uIoU"):  # the run's figures, as JavaScript writes numbers
            value = run.data.metrics[key]
            assert (str(int(value)) if value == int(value) else repr(value)) in row, (key, row)

        # The run's own page: its figures linked to its model, its datasets, source and machine.
        page = rendered_text(runs_url.split("/runs?")[0] + f"/runs/{run.info.run_id}", tmp_path)
        model_metrics = page[page.index("Model metrics ("):page.index("Parameters (")]
        for key in ("hIoU", "sIoU", "uIoU"):
            assert f" {key} " in model_metrics, key
        assert "system/cpu_utilization_percentage" in page
        assert "system/system_memory_usage_megabytes" in page
        assert re.search(r"Logged models \(1\).* model Ready", page), page[-3000:]
        assert re.search(rf"Datasets toyworld-train \({cache_key}\) training \+\d", page)
        assert f"Source splitmatch train {run.data.tags['git_commit'][:7]}" in page
    finally:
        ui.send_signal(signal.SIGINT)
        ui.wait(timeout=60)
