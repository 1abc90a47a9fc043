"""The progress display off a terminal: a line every few seconds and one at the end, notes as
plain sentences; on a terminal, a tqdm bar."""
import fcntl
import io
import os
import select
import struct
import termios
import time

from splitmatch import progress
from splitmatch.progress import Progress


def test_a_log_file_gets_lines_not_a_redrawn_bar(monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    out = io.StringIO()
    with Progress(200, "training demo", "it", initial=100, stream=out) as bar:
        bar.update(150, loss=1.23456)
        bar.note("warning: MLflow at http://127.0.0.1:1 is unreachable")
        bar.update(200, loss=0.5, **{"val hIoU": 41.0})
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("training demo: 150/200 it (75%)  elapsed 00:00  ETA ")
    assert lines[0].endswith("loss 1.235")
    assert lines[1] == "warning: MLflow at http://127.0.0.1:1 is unreachable"
    assert lines[2].startswith("training demo: 200/200 it (100%)") and "val hIoU 41" in lines[2]
    assert lines[-1] == lines[2]  # the last line is written once at close, not twice


def test_quiet_between_lines(monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 3600.0)
    out = io.StringIO()
    with Progress(1000, "pseudo masks", "img", stream=out) as bar:
        for done in range(1, 1001):
            bar.update(done)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]
    assert out.getvalue().startswith("pseudo masks: 1000/1000 img (100%)")


def _on_a_terminal(rows: int, columns: int, monkeypatch, start_up_s: float = 0.0) -> str:
    """What a real pseudo-terminal of this size receives from a 10-step display whose first
    step comes `start_up_s` after it is shown."""
    monkeypatch.setattr(progress, "LINE_EVERY_S", 3600.0)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    with os.fdopen(slave, "w") as terminal:
        with Progress(10, "toy CLIP pretraining", "step", stream=terminal) as bar:
            time.sleep(start_up_s)
            for step in range(1, 11):
                bar.update(step, loss=0.1)
    received = b""
    while select.select([master], [], [], 0.2)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal's other end is closed: all was read
            break
        if not chunk:
            break
        received += chunk
    os.close(master)
    return received.decode()


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    text = _on_a_terminal(30, 100, monkeypatch, start_up_s=1.5)
    assert "toy CLIP pretraining: 100%|" in text and "10/10" in text and "loss=0.1" in text
    # The start-up before the first step is not the steps' time: the bar's clock (elapsed, rate,
    # ETA) starts at the first step.
    assert "10/10 [00:00<00:00" in text, text[-300:]


def test_a_terminal_with_no_size_gets_lines(monkeypatch):
    # `script` with no terminal behind it, and some CI runners, open a pseudo-terminal of 0 rows,
    # where a tqdm bar shows nothing at all.
    text = _on_a_terminal(0, 0, monkeypatch)
    assert "%|" not in text
    assert text.strip().startswith("toy CLIP pretraining: 10/10 step (100%)") and "loss 0.1" in text
