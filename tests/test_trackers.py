"""The logger group's trackers. MLflow: what a run writes, read back with MLflow's own
client from a SQLite store and from a real `mlflow server`. W&B: offline by default, read
back from the run's .wandb files. A resumed run continues the same tracker run with no
point twice; a tracker that fails is a warning, not a lost run."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import RUN, cli, run, wait_for_checkpoint

mlflow = pytest.importorskip("mlflow", reason='the [mlflow] extra: pip install -e ".[mlflow]"')
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = pytest.mark.slow  # real runs, a killed run and an MLflow server


def one_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    (found,) = client.search_runs([exp.experiment_id])
    return found


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def assert_run_matches_its_dir(client, found, run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert history(client, found.info.run_id, "val_acc") == [(r["step"], r["val_acc"]) for r in records]
    assert found.data.metrics["summary/selected_test_acc"] == summary["selected_test_acc"]
    assert found.data.tags["status"] == "completed" and found.info.status == "FINISHED"
    assert found.data.params["method.name"] == "msr" and found.data.params["batch_size"] == "32"
    for key in ("train/loss", "lr"):
        points = history(client, found.info.run_id, key)
        assert points and len({s for s, _ in points}) == len(points), key  # every log point once


def test_a_run_in_a_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = run("debug=quick", "dataset.val_size=64", "logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri={uri}",
              f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    client = MlflowClient(uri)
    assert_run_matches_its_dir(client, one_run(client, "synthetic"), tmp_path / "run")
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))  # TensorBoard beside it


def test_the_default_store_is_outputs_mlflow_db_where_msr_train_started(tmp_path):
    res = run("debug=quick", "logger=mlflow", "logger.mlflow.experiment=mine", f"hydra.run.dir={tmp_path / 'run'}",
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    assert one_run(client, "mine").info.status == "FINISHED"
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))  # logger=mlflow alone: no TensorBoard


def test_a_killed_run_resumes_the_same_mlflow_run_with_no_point_twice(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*RUN, "logger=mlflow", f"logger.mlflow.tracking_uri={uri}"]
    assert run(*args, "logger.mlflow.experiment=straight", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path).returncode == 0
    cmd, kw = cli(*args, "logger.mlflow.experiment=killed", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_checkpoint(proc, tmp_path / "b", min_step=16)
    proc.kill()
    proc.wait()
    res = run(*args, "logger.mlflow.experiment=killed", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert res.returncode == 0 and "Resuming" in res.stderr, res.stderr
    client = MlflowClient(uri)
    straight, killed = one_run(client, "straight"), one_run(client, "killed")
    assert_run_matches_its_dir(client, killed, tmp_path / "b")
    for key in ("val_acc", "test_acc", "train/loss", "lr"):
        assert history(client, killed.info.run_id, key) == history(client, straight.info.run_id, key), key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("w"),
                              start_new_session=True,  # its workers in its process group, stopped with it
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runners
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # starting takes seconds alone, minutes beside other work
    while True:
        try:
            # A fresh opener without proxies: urlopen's global one keeps the proxy settings of
            # its first use (test_data's dead proxy, when the suite runs in one process).
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{url}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, \
                "mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
    yield url, server
    stop(server)


def stop(server):
    """The server and its workers (a process group of their own)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def test_a_real_mlflow_server_and_one_that_goes_away(tmp_path, mlflow_server):
    url, server = mlflow_server
    res = run("debug=quick", "dataset.val_size=64", "logger=mlflow", f"logger.mlflow.tracking_uri={url}",
              f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    client = MlflowClient(url)
    assert_run_matches_its_dir(client, one_run(client, "synthetic"), tmp_path / "run")
    stop(server)
    res = run("debug=quick", "logger=mlflow", f"logger.mlflow.tracking_uri={url}", f"hydra.run.dir={tmp_path / 'gone'}",
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr  # the run is not lost
    assert "logger mlflow: starting failed" in res.stderr and "the run goes on" in res.stderr
    assert json.loads((tmp_path / "gone" / "summary.json").read_text())["status"] == "completed"


def test_mlflow_settings_are_checked():
    from conftest import make_cfg
    from msr_train.checks import validate_config
    from msr_train.errors import ConfigError
    with pytest.raises(ConfigError, match="logger.mlflow.experiment='' must be null or a non-empty string"):
        validate_config(make_cfg("logger=mlflow", "logger.mlflow.experiment=''"))
    with pytest.raises(ConfigError, match="logger.mlflow.uri is not a setting of logger"):
        validate_config(make_cfg("logger=mlflow", "+logger.mlflow.uri=x"))


def test_loggers_may_change_on_resume_and_old_runs_with_trainer_tensorboard_resume():
    from conftest import make_cfg
    from omegaconf import OmegaConf
    from msr_train.state import changed_settings
    saved = OmegaConf.to_container(make_cfg("logger=none"), resolve=True)
    saved["trainer"]["tensorboard"] = True  # a checkpoint written before the logger group
    assert changed_settings(saved, make_cfg("logger=[tensorboard,mlflow]")) == []
    assert changed_settings(saved, make_cfg("logger=mlflow", "seed=1")) == ["seed: 0 -> 1"]


# ---------------------------------------------------------------------------- W&B

def wandb_records(path):
    """The protobuf records of a .wandb file, in W&B's LevelDB-log layout: a 7-byte file
    header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte
    header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # the rest of a block is padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def wandb_points(run_dir):
    """(step, key) -> value over every offline W&B file of the run (a resumed run writes a
    second one), asserting that no point was logged twice; and the last summary values."""
    points, summary, config = {}, {}, {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                step = items.pop("_step")
                for key, value in items.items():
                    if not key.startswith("_"):
                        assert (step, key) not in points, f"{key} at step {step} logged twice"
                        points[step, key] = value
            elif kind == "summary":
                summary.update({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
            elif kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return points, summary, config


@pytest.fixture
def no_wandb_account(monkeypatch, tmp_path):
    pytest.importorskip("wandb", reason='the [wandb] extra: pip install -e ".[wandb]"')
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either


def test_wandb_is_offline_by_default_and_holds_the_runs_numbers(tmp_path, no_wandb_account):
    res = run("debug=quick", "dataset.val_size=64", "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    points, summary, config = wandb_points(tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {(r["step"], r["val_acc"]) for r in records} == {(s, v) for (s, k), v in points.items() if k == "val_acc"}
    final = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["summary/selected_test_acc"] == final["selected_test_acc"] and summary["status"] == "completed"
    assert config["method.name"] == "msr"


def test_wandb_resumes_the_same_run_with_no_point_twice(tmp_path, no_wandb_account):
    """Stopped by SIGTERM (a SIGKILL can lose the points W&B had not yet written: see
    msr_train/trackers.py)."""
    args = [*RUN, "logger=wandb"]
    assert run(*args, f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path).returncode == 0
    cmd, kw = cli(*args, f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_checkpoint(proc, tmp_path / "b", min_step=16)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    res = run(*args, f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert res.returncode == 0 and "Resuming" in res.stderr, res.stderr
    files = list((tmp_path / "b").glob("wandb/offline-run-*/run-*.wandb"))
    assert len({f.name for f in files}) == 1 and len(files) == 2  # one run id, written by two processes
    straight, resumed = wandb_points(tmp_path / "a")[0], wandb_points(tmp_path / "b")[0]  # no point twice
    for key in ("val_acc", "test_acc"):
        assert {s: v for (s, k), v in resumed.items() if k == key} == {s: v for (s, k), v in straight.items() if k == key}


def test_a_logger_without_its_package_is_refused_before_any_work(monkeypatch):
    import importlib.util
    from conftest import make_cfg
    from msr_train.checks import validate_config
    from msr_train.errors import ConfigError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r'logger=wandb needs wandb: pip install -e "\.\[wandb\]"'):
        validate_config(make_cfg("logger=[tensorboard,wandb]"))
    validate_config(make_cfg("logger=mlflow"))  # installed: passes
