#!/usr/bin/env python
"""CPU threads and contention: how fast the real loop trains with 1 thread or all cores,
alone and beside a second training process (as in a 2-job sweep).

Each measurement is a fresh process (``--probe``) that runs ``train()`` for a few steps
(as ``scripts/bench.py`` section 5: steps/s over the run's own training time) with
``trainer.cpu_threads`` set, and, for the OpenMP wait-policy rows, ``OMP_WAIT_POLICY``
in its environment (read once, when the OpenMP runtime starts, hence the fresh process).
"Contended" runs the same measurement while a competitor process trains the same setting
in a loop. Settings are interleaved, the order rotated each round; each number is the
median over ``--repeats`` rounds, and every ratio is to "1 thread, alone" of the same
batch size within the round.

    python scripts/bench_threads.py --out docs/threads.md.table

Nothing is asserted: the script only reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import cpu_model, interleaved, log, loop_rate, table

HERE = Path(__file__).resolve()
ALL = os.cpu_count() or 1
#: (label, trainer.cpu_threads, OMP_WAIT_POLICY or None: the runtime's default).
SETTINGS = [("1 thread", 1, None), (f"{ALL} threads (all cores, the default)", ALL, None),
            (f"{ALL} threads, OMP_WAIT_POLICY=PASSIVE", ALL, "PASSIVE")]
STEPS = {1: 300, 128: 20}


def probe_command(batch: int, threads: int, repeat_forever: bool = False) -> list[str]:
    steps = STEPS.get(batch, max(2, 2560 // batch))
    return [sys.executable, str(HERE), "--probe", str(batch), str(threads), str(steps)] + \
        (["--forever"] if repeat_forever else [])


def environment(policy: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return env | ({"OMP_WAIT_POLICY": policy} if policy else {})


def measure(batch: int, threads: int, policy: str | None, contended: bool) -> float:
    """Steps/s of one fresh probe process, beside a competitor if ``contended``."""
    competitor = None
    if contended:
        competitor = subprocess.Popen(probe_command(batch, threads, True), env=environment(policy),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(8)  # past its startup (imports, data): it is training when we start timing
    try:
        out = subprocess.run(probe_command(batch, threads), env=environment(policy), check=True,
                             capture_output=True, text=True).stdout
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return json.loads(out.strip().splitlines()[-1])["steps_s"]


def section(args, batch: int) -> list[dict]:
    runs = {(label, contended): (lambda t=threads, p=policy, c=contended: measure(batch, t, p, c))
            for label, threads, policy in SETTINGS for contended in (False, True)}
    res = interleaved(runs, args.repeats)
    base = res[(SETTINGS[0][0], False)]
    rows = []
    for (label, contended), rates in res.items():
        rows.append({"batch": batch, "setting": label, "contended": contended, "steps_s": statistics.median(rates),
                     "ratio": statistics.median(r / b for r, b in zip(rates, base))})
        log(f"batch {batch}, {label}, {'beside a competitor' if contended else 'alone'}: "
            f"{rows[-1]['steps_s']:.2f} steps/s, x{rows[-1]['ratio']:.2f}")
    return rows


def markdown(args, rows: list[dict], command: str, elapsed: float) -> str:
    head = [f"Machine: {cpu_model()}, {ALL} cores. Command: `{command}` ({elapsed / 60:.1f} min). "
            f"resnet20, method msr (its defaults), Fashion-MNIST; medians of {args.repeats} interleaved rounds.", ""]
    body = [[r["batch"], r["setting"], "beside a 2nd run" if r["contended"] else "alone", f"{r['steps_s']:.2f}",
             f"{r['steps_s'] * r['batch']:.0f}", f"{r['ratio']:.2f}"] for r in rows]
    return "\n".join(head + [table(["batch", "threads", "machine", "steps/s", "img/s", "/ 1 thread alone"], body)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="1,128", help="batch sizes (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default %(default)s)")
    p.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    p.add_argument("--probe", nargs=3, type=int, metavar=("BATCH", "THREADS", "STEPS"), help=argparse.SUPPRESS)
    p.add_argument("--forever", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        batch, threads, steps = args.probe
        while True:
            print(json.dumps({"steps_s": loop_rate("resnet20", "msr", batch, steps, threads)}), flush=True)
            if not args.forever:
                return
    command = shlex.join(["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    rows = [row for batch in (int(b) for b in args.batch_sizes.split(",")) for row in section(args, batch)]
    text = markdown(args, rows, command, time.perf_counter() - started)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
