#!/usr/bin/env python
"""Every run behind docs/results.md's 10-epoch and long protocols, normalization-batch
table, depth figure and VGG screen, run two at a time and resumably: re-running the same command skips what
finished, resumes what was interrupted (each run is one msr-train run dir) and starts the
rest, so a sweep of many hours survives kills, reboots and new machines.

    python scripts/evidence.py                 # everything, 2 runs at a time
    python scripts/evidence.py --list          # what is done, running-able and waiting
    python scripts/evidence.py --report        # the learning-rate screen's table
    echo 1 > outputs/evidence/max_jobs         # one run at a time from now on (rm the file: --jobs again)

The plan, in order of priority (short runs, and runs whose results decide others, first):

1. ``converged``: ``experiment=fashion_mnist_converged`` (the 10-epoch protocol) per method.
   The learning rate is screened on seed 0 at 0.5x / 1x / 2x the method's default, and
   past a winning edge (``Screen``): the rate with the best validation accuracy (never a
   test number; a run that diverged or stalled at chance never wins; where none trains,
   the screen says so and no seeds run) then runs seeds 1-4, so seed 0 of the 5 is
   the screen's run at that rate. Its seeds come before the long part: its verdicts
   complete in hours, the long part's in days.
2. ``long``: bn, msr_paper and msr_authors in the default run's recipe (all 55,000 training
   images, 18 epochs), screened and seeded the same way; the archived default runs are
   its msr_paper runs at 1x (``REUSED``).
3. ``norm_batch``: bn at its first-grid rate with ghost batches of 1, 2, 8 and 32 (5 seeds
   each), and one run of msr at ``trainer.accumulate=16`` (its result must not depend on
   the micro-batch).
4. ``depth``: ResNet-8/20/56/110 for bn, msr, nf, gn_ws and none, and ResNet-56/110 for
   msr_authors, at their first-grid rates, 3 seeds, 3 epochs (the same budget for every
   depth). A depth run that diverges at its rate runs again at half of it (``depth_retry``).
5. ``default``: ``msr-train`` with no arguments, seeds 0-2: the README's default-run figure.
6. ``depth`` again: VGG-11/16 for bn, msr, none, as the ResNets.
7. ``vgg``: VGG-11/16 for bn, msr_paper, msr_vp (msr_paper with a variance-preserving
   scale init, at msr_paper's ResNet-20 rate), msr_authors and none in the 10-epoch
   protocol with signal propagation recorded, screened on seed 0 at 0.01x-1x of the
   method's ResNet-20 rate (and past a winning edge), then seeds 1-2 at the chosen rate;
   VGG-11 whole (screen and seeds) before any VGG-16 run, so the cheaper network's answer
   comes first.

Runs train in ``outputs/evidence/<part>/<name>``; each run's console output goes to
``outputs/evidence/logs/<part>-<name>.log``. A run whose summary says ``completed`` or
``diverged`` is done; one that ``failed`` is reported and not retried (read its log).
Each normalization-batch run is then evaluated by ``msr-eval`` with per-example statistics
and with precise BN (on validation and test), while its checkpoints exist.

A finished run's small files (summary, metrics, Hydra's config, msr-eval results; no
checkpoints) are copied to ``docs/evidence/runs/<part>/<name>``, which is committed: a
machine that starts without ``outputs/`` (a new checkout) skips what the archive holds, and
msr-compare reads the archive as it reads a run dir.
"""

from __future__ import annotations

import argparse
import functools
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

from msr_train import compare
from msr_train.run_files import METRICS, SIGNAL_PROP, SUMMARY

PROTOCOL = "experiment=fashion_mnist_converged"
# bn first: every comparison's baseline.
METHODS = ("bn", "nf", "gn_ws", "gn", "mimicnorm", "bnp", "none", "msr_paper", "msr_authors")
LR_MULTS = (0.5, 1.0, 2.0)  # a screen's first grid, multiples of the method's default rate
VGG_MULTS = (0.01, 0.05, 0.2, 1.0)  # VGG's first grid, multiples of the method's ResNet-20 rate
MAX_GRID = 7  # a screen whose edge keeps winning stops growing here
SEEDS = (0, 1, 2, 3, 4)
GHOST_BATCHES = (1, 2, 8, 32)
DEPTH_MODELS = ("resnet8", "resnet20", "resnet56", "resnet110")
DEPTH_METHODS = ("bn", "msr_paper", "nf", "gn_ws", "none")
VGG_MODELS, VGG_METHODS = ("vgg11", "vgg16"), ("bn", "msr_paper", "none")
VGG_SCREEN_METHODS = ("bn", "msr_paper", "msr_vp", "msr_authors", "none")
# A VGG screen scales its method's ResNet-20 rate; msr_vp (msr_paper with a variance-
# preserving scale init, for plain stacks only) has none of its own and takes msr_paper's.
VGG_RATE_OF = {"msr_vp": "msr_paper"}
# (priority stage, models, methods) of the depth part: the ResNets, the VGGs at the
# ResNet-20 rate, and msr_authors where msr_paper diverged at it.
DEPTH_GRIDS = ((5, DEPTH_MODELS, DEPTH_METHODS), (7, VGG_MODELS, VGG_METHODS), (5, ("resnet56", "resnet110"), ("msr_authors",)))
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
        return run_summary(root, self.part, self.name).get("status")

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


@functools.cache  # composing a config takes a tenth of a second, and the plan is made every 30 s
def default_lr(method: str, protocol: tuple[str, ...] = (PROTOCOL,)) -> float:
    with initialize_config_module("msr_train.conf", version_base="1.3"):
        return compose("config", [*protocol, f"method={method}"]).optimizer.lr


def default_lrs() -> dict[str, dict[str, float]]:
    """Each screened part's default rate per method (VGG's screen scales the ResNet-20 choice)."""
    methods = set(METHODS) | set(DEPTH_METHODS) | set(VGG_METHODS) | set(VGG_SCREEN_METHODS)
    return {"converged": {m: default_lr(m) for m in methods},
            "long": {m: default_lr(m, LONG.protocol) for m in LONG_METHODS}}


def archived_dir(part: str, name: str) -> Path | None:
    """The archive's folder of a finished run: its own, or the archived run it is (REUSED)."""
    for run_dir in (ARCHIVE / part / name, ARCHIVE / REUSED.get((part, name), "-")):
        if (run_dir / SUMMARY).is_file():
            return run_dir
    return None


def run_summary(root: Path, part: str, name: str) -> dict:
    """A run's summary from ``root``, else from the archive (archived_dir)."""
    for run_dir in filter(None, (root / part / name, archived_dir(part, name))):
        try:
            return json.loads((run_dir / SUMMARY).read_text())
        except (OSError, ValueError):
            continue
    return {}


NO_RATE = "none trains"  # a finished screen's choice when no rate of its grid trained


def screen_outcome(summary: dict) -> float | str:
    """A finished screen run's best validation accuracy, or how it failed: ``diverged``, or
    ``stalled`` (completed at chance: msr-compare's rule)."""
    status = compare.run_status(summary, summary.get("config"))
    if status == "completed" and summary.get("best_val_acc") is not None:
        return summary["best_val_acc"]
    return "stalled" if status == "stalled" else "diverged"


@dataclass(frozen=True)
class Screen:
    """A learning-rate screen on seed 0 (validation accuracy chooses; a run that diverged or
    stalled never wins; a tie keeps the default), then the other seeds at the chosen
    multiple. While the best multiple is an edge of the grid, the grid grows one step past
    it (x2 above, /2 below), up to MAX_GRID multiples: a method's seeds run at an interior
    optimum, not at the grid's edge. Where no rate trained, the grid grows away from the
    failure: down while every run diverged, up while the highest rate stalled; stalled
    below and diverged above (or MAX_GRID reached) ends it with NO_RATE, and no seeds run."""
    part: str
    protocol: tuple[str, ...]
    seeds: tuple[int, ...]
    grid: tuple[float, ...] = LR_MULTS
    model: str | None = None  # in the run names, for one part holding several models' screens

    def name(self, method: str, mult: float | None, seed: int) -> str:
        prefix = f"{self.model}-" if self.model else ""
        return f"{prefix}{method}-seed{seed}" if mult is None else f"{prefix}{method}-lr{mult:g}x-seed{seed}"

    def progress(self, root: Path, method: str, extend: bool = True) -> tuple[list[float], float | str | None]:
        """The multiples to screen so far, and the choice: a multiple, NO_RATE, or None
        until they all finished."""
        mults = sorted(self.grid)
        while True:
            outcomes = {}
            for mult in mults:
                summary = run_summary(root, self.part, self.name(method, mult, 0))
                if summary.get("status") not in DONE:
                    return mults, None
                outcomes[mult] = screen_outcome(summary)
            best, step = next_step(mults, outcomes)
            if step is None or not extend or len(mults) >= MAX_GRID:
                return mults, best
            mults = sorted([*mults, step])

    def job(self, method: str, lr: float, mult: float, seed: int, priority: tuple) -> Job:
        return Job(self.part, self.name(method, mult, seed),
                   [*self.protocol, f"method={method}", f"optimizer.lr={lr * mult:g}", f"seed={seed}"], priority)

    def jobs(self, root: Path, method: str, lr: float | None, ranks: tuple[tuple, tuple],
             rate_of: str | None = None) -> list[Job]:
        """The screen's runs (priority ``ranks[0]``) and the seeds' (``ranks[1]``); with
        ``lr`` None (the ResNet-20 rate of ``rate_of``, default the method, still being
        chosen) every run waits."""
        if lr is None:
            return [Job(self.part, self.name(method, None, s), [], (*ranks[0], s),
                        needs=[f"{rate_of or method}'s ResNet-20 rate"])
                    for s in self.seeds]
        mults, chosen = self.progress(root, method)
        jobs = [self.job(method, lr, mult, 0, ranks[0]) for mult in mults]
        if chosen == NO_RATE:  # nothing to run the seeds at: the screen is the answer
            return jobs
        for seed in self.seeds[1:]:
            jobs.append(self.job(method, lr, chosen, seed, (*ranks[1], seed)) if chosen is not None else
                        Job(self.part, self.name(method, None, seed), [], (*ranks[1], seed),
                            needs=[f"{self.part} screen of {method}"]))
        return jobs


CONVERGED = Screen("converged", (PROTOCOL,), SEEDS)
# The default run's recipe (msr-train with no arguments: 55,000 images, 18 epochs) for any method.
LONG = Screen("long", ("trainer.cpu_threads=1", "trainer.progress_bar=false"), SEEDS)
LONG_METHODS = ("bn", "msr_paper", "msr_authors")
VGG_SCREENS = tuple(Screen("vgg", (PROTOCOL, f"model={m}", "trainer.signal_prop=true"), DEPTH_SEEDS, VGG_MULTS, model=m)
                    for m in VGG_MODELS)
# The default run is LONG's msr_paper at 1x exactly (tests/test_scripts.py compares the
# composed configs): its archived seeds are those runs.
REUSED = {("long", LONG.name("msr_paper", 1.0, s)): f"default/seed{s}" for s in DEPTH_SEEDS}


def next_step(mults: list[float], outcomes: dict[float, float | str]) -> tuple[float | str, float | None]:
    """A screen's choice so far (the best rate that trained, or NO_RATE) and the multiple
    to add next, None where the choice is final (Screen). With no rate trained and a mix
    of failures, only a stalled top grows (upwards): a grid that diverged at its lowest
    rate but stalled above it (no monotone picture) ends there."""
    trained = {m: v for m, v in outcomes.items() if not isinstance(v, str)}
    if trained:
        best = max(trained, key=lambda m: (trained[m], m == 1.0))
        edge = {mults[0]: best / 2, mults[-1]: best * 2}
        return best, edge.get(best)
    if all(v == "diverged" for v in outcomes.values()):
        return NO_RATE, mults[0] / 2
    return NO_RATE, mults[-1] * 2 if outcomes[mults[-1]] == "stalled" else None


def first_choices(root: Path) -> dict[str, float | None]:
    """Each method's choice on the converged screen's first grid (0.5x-2x): the rate of
    the normalization-batch and depth parts, which ran at it before the grid was extended.
    Where no rate of the first grid trained, the extended screen's choice once made; None
    while it is not, or where no rate trained at all (the runs that need it never run)."""
    choices = {}
    for method in METHODS:
        chosen = CONVERGED.progress(root, method, extend=False)[1]
        if chosen == NO_RATE:
            chosen = CONVERGED.progress(root, method)[1]
        choices[method] = None if chosen == NO_RATE else chosen
    return choices


def plan(root: Path, lrs: dict[str, dict[str, float]]) -> list[Job]:
    """Every job whose inputs are known now (a screen's seeds wait for its choice). Stages,
    in order: the converged screen and its seeds (short runs: the 10-epoch verdicts whole
    first), the long screen and its seeds, the depth parts,
    VGG-11's screen and seeds, VGG-16's."""
    jobs, first = [], first_choices(root)
    for i, method in enumerate(METHODS):
        jobs += CONVERGED.jobs(root, method, lrs["converged"][method], ((0, i), (1, i)))
    for i, method in enumerate(LONG_METHODS):
        jobs += LONG.jobs(root, method, lrs["long"][method], ((2, i), (3, i)))
    jobs += later_parts(lrs["converged"], first)
    for k, screen in enumerate(VGG_SCREENS):
        for i, method in enumerate(VGG_SCREEN_METHODS):
            jobs += screen.jobs(root, method, vgg_rate(method, lrs, first), ((8, k, 0, i), (8, k, 1, i)),
                                VGG_RATE_OF.get(method))
    return jobs + half_rate_retries(jobs, root)


def vgg_rate(method: str, lrs: dict[str, dict[str, float]], first: dict[str, float | None]) -> float | None:
    """The ResNet-20 rate a VGG screen scales: the first grid's choice of the method (or
    of the method in VGG_RATE_OF), None until it is chosen."""
    resnet20 = VGG_RATE_OF.get(method, method)
    return None if first[resnet20] is None else lrs["converged"][resnet20] * first[resnet20]


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


def later_parts(lrs: dict[str, float], first: dict[str, float | None]) -> list[Job]:
    """The normalization-batch and depth runs, each at its method's first-grid rate."""
    jobs = []
    for g in GHOST_BATCHES:
        for seed in SEEDS:
            jobs.append(Job("norm_batch", f"bn-ghost{g}-seed{seed}", [PROTOCOL, "method=bn", f"method.ghost_batch_size={g}",
                            f"seed={seed}"], (4, g, seed), needs=["bn"]))
    jobs.append(Job("norm_batch", "msr_paper-accumulate16-seed0",
                    [PROTOCOL, "method=msr_paper", "trainer.accumulate=16", "seed=0"], (4, 99), needs=["msr_paper"]))
    for stage, models, methods in DEPTH_GRIDS:
        for seed in DEPTH_SEEDS:
            for model in models:
                for method in methods:
                    jobs.append(Job("depth", f"{model}-{method}-seed{seed}",
                                    [PROTOCOL, f"model={model}", f"method={method}", f"epochs={DEPTH_EPOCHS}",
                                     f"seed={seed}", "trainer.signal_prop=true"],  # the networks at init too
                                    (stage, seed, model), needs=[method]))
    jobs += [Job("default", f"seed{seed}", [f"seed={seed}", "trainer.cpu_threads=1"], (6, seed))
             for seed in DEPTH_SEEDS]
    for job in jobs:  # the chosen rate, once known
        if job.needs and all(first[m] is not None for m in job.needs):
            job.overrides.append(f"optimizer.lr={lrs[job.needs[0]] * first[job.needs[0]]:g}")
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
    to 1 while the test suite runs (the running runs finish; no new one starts), or to 0
    to let the driver exit once the running runs end (to restart it on new code)."""
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
    """Every learning-rate screen as markdown tables: validation accuracy (the choice) and
    the epoch of the best one (a best before the last epoch: the run had flattened)."""
    lrs, first = default_lrs(), first_choices(root)
    screens = [(CONVERGED, METHODS, lrs["converged"]), (LONG, LONG_METHODS, lrs["long"])]
    vgg = {m: vgg_rate(m, lrs, first) or float("nan") for m in VGG_SCREEN_METHODS}
    screens += [(s, VGG_SCREEN_METHODS, vgg) for s in VGG_SCREENS]
    return "\n\n".join(screen_table(root, *screen) for screen in screens)


def screen_table(root: Path, screen: Screen, methods: tuple[str, ...], lrs: dict[str, float]) -> str:
    grids = {m: screen.progress(root, m) for m in methods}
    mults = sorted({mult for ms, _ in grids.values() for mult in ms})
    title = f"{screen.part}" + (f" ({screen.model})" if screen.model else "")
    lines = [f"| {title}: method | " + " | ".join(f"{m:g}x" for m in mults) + " | chosen |",
             "|---" * (len(mults) + 2) + "|"]
    for method in methods:
        cells = [screen_cell(run_summary(root, screen.part, screen.name(method, mult, 0)), lrs[method] * mult)
                 if mult in grids[method][0] else "" for mult in mults]
        chosen = grids[method][1]
        shown = "-" if chosen is None else chosen if chosen == NO_RATE else f"{chosen:g}x"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {shown} |")
    return "\n".join(lines)


def screen_cell(summary: dict, lr: float) -> str:
    if not summary:
        return "not run yet"
    outcome = screen_outcome(summary) if summary["status"] in DONE else summary["status"]
    if isinstance(outcome, str):
        return f"lr {lr:g}: {outcome}"
    return f"lr {lr:g}: {100 * outcome:.2f} (epoch {summary['best_val_epoch']:g})"


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
