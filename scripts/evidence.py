#!/usr/bin/env python
"""Every run behind docs/results.md's converged protocol, normalization-batch table and
depth figure, run two at a time and resumably: re-running the same command skips what
finished, resumes what was interrupted (each run is one msr-train run dir) and starts the
rest, so a sweep of many hours survives sessions, kills and reboots.

    python scripts/evidence.py                 # everything, 2 runs at a time
    python scripts/evidence.py --list          # what is done, running-able and waiting
    python scripts/evidence.py --report        # the learning-rate screen's table
    echo 1 > outputs/evidence/max_jobs         # one run at a time from now on (rm the file: --jobs again)

The plan, in order of priority (method by method, so that complete 5-seed comparisons
land first):

1. ``converged``: ``experiment=fashion_mnist_converged`` per method. The learning rate is
   screened at 0.5x / 1x / 2x the method's default on seed 0; the rate with the best
   validation accuracy (never a test number; a diverged run never wins) then runs seeds
   1-4, so seed 0 of the 5 is the screen's run at that rate.
2. ``norm_batch``: bn at its chosen rate with ghost batches of 1, 2, 8 and 32 (5 seeds
   each), and one run of msr at ``trainer.accumulate=16`` (its result must not depend on
   the micro-batch).
3. ``depth``: ResNet-8/20/56/110 for bn, msr, nf, gn_ws and none at their chosen rates, 3
   seeds, 3 epochs (the same budget for every depth).
   A depth run that diverges at its chosen rate runs again at half of it (``depth_retry``).
4. ``default``: ``msr-train`` with no arguments, seeds 0-2: the README's default-run figure
   for MSR's defaults since session 11 (the paper's settings).
5. ``depth`` again: VGG-11/16 for bn, msr, none, as the ResNets (the issue's "if the budget
   allows": after the default runs, which the README's headline number needs).

Runs train in ``outputs/evidence/<part>/<name>``; each run's console output goes to
``outputs/evidence/logs/<part>-<name>.log``. A run whose summary says ``completed`` or
``diverged`` is done; one that ``failed`` is reported and not retried (read its log).
Each normalization-batch run is then evaluated by ``msr-eval`` with per-example statistics
and with precise BN (on validation and test), while its checkpoints exist.

A finished run's small files (summary, metrics, Hydra's config, msr-eval results; no
checkpoints) are copied to ``docs/evidence/runs/<part>/<name>``, which is committed: a
machine that starts without ``outputs/`` (a new session) skips what the archive holds, and
msr-compare reads the archive as it reads a run dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_module

from msr_train.run_files import METRICS, SIGNAL_PROP, SUMMARY

PROTOCOL = "experiment=fashion_mnist_converged"
# bn first (every comparison's baseline); msr's two configurations last, because
# session 10 measured them on a machine whose outputs/ was then lost (docs/results.md).
METHODS = ("bn", "nf", "gn_ws", "gn", "mimicnorm", "bnp", "none", "msr_paper", "msr_authors")
LR_MULTS = (0.5, 1.0, 2.0)
SEEDS = (0, 1, 2, 3, 4)
GHOST_BATCHES = (1, 2, 8, 32)
DEPTH_MODELS = ("resnet8", "resnet20", "resnet56", "resnet110")
DEPTH_METHODS = ("bn", "msr_paper", "nf", "gn_ws", "none")
VGG_MODELS, VGG_METHODS = ("vgg11", "vgg16"), ("bn", "msr_paper", "none")
DEPTH_SEEDS, DEPTH_EPOCHS = (0, 1, 2), 3
DONE = ("completed", "diverged")
ARCHIVE = Path("docs/evidence/runs")
ARCHIVED = (SUMMARY, METRICS, SIGNAL_PROP, ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml")
# BN's remedies for tiny normalization batches, applied to the val-selected checkpoint.
NORM_BATCH_EVALS = (("method.eval_statistics=example",), ("method.precise_bn_batches=200",))


@dataclass
class Job:
    """One training run, or (``evaluates``) one msr-eval of a training run's best checkpoint."""
    part: str
    name: str
    overrides: list[str]
    priority: tuple
    needs: list[str] = field(default_factory=list)  # methods whose learning rate must be chosen first
    evaluates: str | None = None                     # the split, for an msr-eval job

    @property
    def key(self) -> tuple:
        return self.part, self.name, self.evaluates, tuple(self.overrides) if self.evaluates else ()

    def dir(self, root: Path) -> Path:
        return root / self.part / self.name

    def status(self, root: Path) -> str | None:
        if self.evaluates:
            return self.eval_status(root)
        return run_status(self.dir(root)) or run_status(ARCHIVE / self.part / self.name)

    def eval_file(self) -> str:
        tag = "".join(f"_{o}" for o in self.overrides)
        return f"eval_best_{self.evaluates}{tag}.json"

    def eval_status(self, root: Path) -> str | None:
        if any((d / self.eval_file()).exists() for d in (self.dir(root), ARCHIVE / self.part / self.name)):
            return "completed"
        if run_status(self.dir(root)) == "completed" and (self.dir(root) / "checkpoints" / "best.pt").exists():
            return None  # to run
        return "waiting"

    def command(self, root: Path) -> list[str]:
        if self.evaluates:
            return [sys.executable, "-m", "msr_train.eval_cli", str(self.dir(root)), "--split", self.evaluates,
                    *self.overrides]
        return [sys.executable, "-m", "msr_train.cli", *self.overrides, f"hydra.run.dir={self.dir(root)}"]


def run_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / SUMMARY).read_text()).get("status")
    except (OSError, ValueError):
        return None


def archive(run_dir: Path, part: str, name: str) -> None:
    """Copy a finished run's small files into the committed archive (each file whole, via a
    temporary name, so a kill mid-copy leaves no torn file)."""
    dest = ARCHIVE / part / name
    for rel in (*ARCHIVED, *(p.name for p in run_dir.glob("eval_*.json"))):
        src = run_dir / rel
        if src.exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            tmp = (dest / rel).with_suffix(".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest / rel)


def default_lr(method: str) -> float:
    with initialize_config_module("msr_train.conf", version_base="1.3"):
        return compose("config", [PROTOCOL, f"method={method}"]).optimizer.lr


def default_lrs() -> dict[str, float]:
    return {m: default_lr(m) for m in set(METHODS) | set(DEPTH_METHODS) | set(VGG_METHODS)}


def screen_name(method: str, mult: float, seed: int) -> str:
    return f"{method}-lr{mult:g}x-seed{seed}"


def chosen_mult(root: Path, method: str) -> float | None:
    """The screened multiple with the best validation accuracy, once all three finished."""
    scores = {}
    for mult in LR_MULTS:
        summary = screen_summary(root, method, mult)
        if summary.get("status") not in DONE:
            return None
        ok = summary["status"] == "completed" and summary.get("best_val_acc") is not None
        scores[mult] = summary["best_val_acc"] if ok else float("-inf")
    return max(LR_MULTS, key=lambda m: (scores[m], m == 1.0))  # a tie keeps the default


def screen_summary(root: Path, method: str, mult: float) -> dict:
    for base in (root, ARCHIVE):
        try:
            return json.loads((base / "converged" / screen_name(method, mult, 0) / SUMMARY).read_text())
        except (OSError, ValueError):
            continue
    return {}


def plan(root: Path, lrs: dict[str, float]) -> list[Job]:
    """Every job whose inputs are known now (the seeds of a method wait for its screen)."""
    jobs, mults = [], {m: chosen_mult(root, m) for m in METHODS}
    for i, method in enumerate(METHODS):
        for mult in LR_MULTS:
            jobs.append(Job("converged", screen_name(method, mult, 0),
                            [PROTOCOL, f"method={method}", f"optimizer.lr={lrs[method] * mult:g}", "seed=0"], (i, 0)))
        for seed in SEEDS[1:]:
            if mults[method] is not None:
                mult = mults[method]
                jobs.append(Job("converged", screen_name(method, mult, seed),
                                [PROTOCOL, f"method={method}", f"optimizer.lr={lrs[method] * mult:g}", f"seed={seed}"],
                                (i, 1)))
            else:
                jobs.append(Job("converged", f"{method}-seed{seed}", [], (i, 1), needs=[method]))
    jobs += later_parts(lrs, mults)
    return jobs + half_rate_retries(jobs, root)


def half_rate_retries(jobs: list[Job], root: Path) -> list[Job]:
    """A depth run that diverged at its method's chosen rate (chosen on ResNet-20) runs
    once more at half that rate, in part ``depth_retry`` under the same name: the depth
    figure then shows whether the method fails at that depth or only needs a smaller rate
    there (a diverged point alone cannot tell). The retry's own result stands either way."""
    retries = []
    for job in jobs:
        if job.part == "depth" and not job.needs and job.status(root) == "diverged":
            rate = next(o for o in job.overrides if o.startswith("optimizer.lr="))
            half = f"optimizer.lr={float(rate.split('=')[1]) / 2:g}"
            retries.append(Job("depth_retry", job.name, [half if o == rate else o for o in job.overrides],
                               (*job.priority, 1)))
    return retries


def chosen_lr(method: str, lrs, mults) -> str:
    return f"optimizer.lr={lrs[method] * mults[method]:g}"


def later_parts(lrs, mults) -> list[Job]:
    """The normalization-batch and depth runs, each at its method's chosen rate."""
    jobs = []
    for g in GHOST_BATCHES:
        for seed in SEEDS:
            jobs.append(Job("norm_batch", f"bn-ghost{g}-seed{seed}", [PROTOCOL, "method=bn", f"method.ghost_batch_size={g}",
                            f"seed={seed}"], (len(METHODS), g, seed), needs=["bn"]))
    jobs.append(Job("norm_batch", "msr_paper-accumulate16-seed0",
                    [PROTOCOL, "method=msr_paper", "trainer.accumulate=16", "seed=0"], (len(METHODS), 99), needs=["msr_paper"]))
    for k, (models, methods) in enumerate(((DEPTH_MODELS, DEPTH_METHODS), (VGG_MODELS, VGG_METHODS))):
        for seed in DEPTH_SEEDS:
            for model in models:
                for method in methods:
                    jobs.append(Job("depth", f"{model}-{method}-seed{seed}",
                                    [PROTOCOL, f"model={model}", f"method={method}", f"epochs={DEPTH_EPOCHS}",
                                     f"seed={seed}", "trainer.signal_prop=true"],  # the networks at init too
                                    (len(METHODS) + 1 + 2 * k, seed, model), needs=[method]))
    jobs += [Job("default", f"seed{seed}", [f"seed={seed}", "trainer.cpu_threads=1"], (len(METHODS) + 2, seed))
             for seed in DEPTH_SEEDS]
    for job in jobs:  # the chosen rate, once known
        if job.needs and all(mults[m] is not None for m in job.needs):
            job.overrides.append(chosen_lr(job.needs[0], lrs, mults))
            job.needs = []
    ghost_runs = [j for j in jobs if "-ghost" in j.name]
    return jobs + [Job(j.part, j.name, list(overrides), (*j.priority, 1 + k), evaluates=split)
                   for j in ghost_runs for k, overrides in enumerate(NORM_BATCH_EVALS) for split in ("val", "test")]


def wait_any(running: dict, poll_s: float = 30.0) -> int | None:
    """The pid of a run that ended, or None after ``poll_s`` (to re-read the job limit)."""
    deadline = time.monotonic() + poll_s
    while time.monotonic() < deadline:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid:
            return pid
        time.sleep(1)
    return None


def start(job: Job, root: Path) -> subprocess.Popen:
    log = root / "logs" / f"{job.part}-{job.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = job.command(root)
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        # one thread each: msr-eval has no cpu_threads setting, and training's is 1 too
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def runnable(jobs: list[Job], root: Path, running: dict, failed: set) -> list[Job]:
    """Jobs to start: inputs known, not done, not waiting for a run, not running or failed
    (a run dir holds one process at a time, so its evaluations wait for its training)."""
    busy = {(j.part, j.name) for j in running.values()}
    return sorted((j for j in jobs if not j.needs and j.status(root) not in (*DONE, "waiting")
                   and (j.part, j.name) not in busy and j.key not in failed), key=lambda j: j.priority)


def archive_finished(jobs: list[Job], root: Path) -> None:
    """Bring the archive up to date with every finished run dir under ``root``."""
    for job in jobs:
        if not job.evaluates and run_status(job.dir(root)) in DONE:
            archive(job.dir(root), job.part, job.name)


def job_limit(root: Path, n_jobs: int) -> int:
    """``--jobs``, or the number in ``<root>/max_jobs`` while that file exists: lower it
    to 1 while the test suite runs (the running runs finish; no new one starts)."""
    try:
        return int((root / "max_jobs").read_text())
    except (OSError, ValueError):
        return n_jobs


def run_all(root: Path, n_jobs: int) -> int:
    lrs = default_lrs()
    running, failed = {}, set()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C
    archive_finished(plan(root, lrs), root)
    try:
        while True:
            todo = runnable(plan(root, lrs), root, running, failed)
            while todo and len(running) < job_limit(root, n_jobs):
                job = todo.pop(0)
                todo = [j for j in todo if (j.part, j.name) != (job.part, job.name)]
                print(f"{time.strftime('%H:%M:%S')} start {describe(job)}", flush=True)
                running[start(job, root).pid] = job
            if not running:
                break
            pid = wait_any(running)
            job = running.pop(pid, None) if pid else None
            if job is not None:
                status = job.status(root)
                print(f"{time.strftime('%H:%M:%S')} {status or 'no result'}: {describe(job)}", flush=True)
                if status in DONE:
                    archive(job.dir(root), job.part, job.name)
                else:
                    failed.add(job.key)
    except KeyboardInterrupt:
        print(f"{time.strftime('%H:%M:%S')} stopping: each running run checkpoints; re-run to resume", flush=True)
        for pid in running:
            os.kill(pid, signal.SIGTERM)
        for pid in running:
            os.waitpid(pid, 0)
    print(f"not finished (see their logs): {sorted(failed)}" if failed else "nothing failed")
    return 1 if failed else 0


def describe(job: Job) -> str:
    return f"{job.part}/{job.name}" + (f" (msr-eval {job.evaluates} {' '.join(job.overrides)})" if job.evaluates else "")


def screen_report(root: Path) -> str:
    """The learning-rate screen as a markdown table: validation accuracy (the choice) and
    the epoch of the best one (a best before the last epoch: the run had flattened)."""
    lrs = default_lrs()
    lines = ["| method | " + " | ".join(f"{m:g}x" for m in LR_MULTS) + " | chosen |", "|---" * (len(LR_MULTS) + 2) + "|"]
    for method in METHODS:
        cells = []
        for mult in LR_MULTS:
            s = screen_summary(root, method, mult)
            if not s:
                cells.append("not run yet")
                continue
            acc = s.get("best_val_acc")
            cells.append(f"lr {lrs[method] * mult:g}: {s['status']}" if s["status"] != "completed" or acc is None
                         else f"lr {lrs[method] * mult:g}: {100 * acc:.2f} (epoch {s['best_val_epoch']:g})")
        mult = chosen_mult(root, method)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'-' if mult is None else f'{mult:g}x'} |")
    return "\n".join(lines)


def list_jobs(root: Path) -> None:
    lrs = default_lrs()
    for job in sorted(plan(root, lrs), key=lambda j: j.priority):
        state = "waits for " + ", ".join(job.needs) if job.needs else (job.status(root) or "to run")
        print(f"{describe(job)}: {state}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("outputs/evidence"))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--list", action="store_true", help="list the plan and each run's state, run nothing")
    p.add_argument("--report", action="store_true", help="print the learning-rate screen's table, run nothing")
    args = p.parse_args()
    if args.list:
        list_jobs(args.root)
        return 0
    if args.report:
        print(screen_report(args.root))
        return 0
    return run_all(args.root, args.jobs)


if __name__ == "__main__":
    sys.exit(main())
