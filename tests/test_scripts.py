"""The benchmark scripts run end to end (on generated data, in seconds) and report what
they measured."""

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_time_to_accuracy_reports_each_methods_steps_and_ratio(tmp_path, monkeypatch, one_thread):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    sys.modules.pop("time_to_accuracy", None)
    import time_to_accuracy
    out = tmp_path / "tta.md"
    # A target every run reaches at its first evaluation (step 2), and one none reaches.
    time_to_accuracy.main(["--methods", "bn,msr", "--model", "resnet8", "--batch-size", "32", "--epochs", "1",
                           "--target", "0.01", "--eval-every", "2", "--rounds", "2", "--out", str(out),
                           "debug=quick", "dataset.val_size=64", "dataset.image_size=8"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| bn ") or line.startswith("| msr ")}
    assert set(rows) == {"bn", "msr"}
    for cells in rows.values():
        assert cells[1] == "2/2" and cells[2] == "2" and float(cells[3]) >= 0
    assert rows["bn"][5] == "1.00" and float(rows["msr"][5]) > 0
    time_to_accuracy.main(["--methods", "bn", "--model", "resnet8", "--batch-size", "32", "--epochs", "1",
                           "--target", "1.0", "--rounds", "1", "--out", str(out), "debug=quick",
                           "dataset.val_size=64", "dataset.image_size=8"])
    assert "| bn | 0/1 | not reached |" in out.read_text()
