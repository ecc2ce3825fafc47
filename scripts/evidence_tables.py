#!/usr/bin/env python
"""Every table and figure of docs/results.md's archived sections, rebuilt from the
evidence archive (docs/evidence/runs, which scripts/evidence.py fills) by one command:

    python scripts/evidence_tables.py               # every section, into docs/img/
    python scripts/evidence_tables.py --list        # each section's runs, build nothing
    python scripts/evidence_tables.py --only long   # the sections whose folder starts so

Which runs a section holds follows evidence.py's rules, not a list kept by hand: a
screened part's rows are each method's seeds at its screen's choice (folders ``chosen``),
or at the first grid's choice (0.5x-2x, folders ``first_grid``) where the page reports the
verdicts made there; a method whose seeds at that rate are not all archived is left out
and named. Each output folder gets ``made_by.md``: the command that made it, its runs and
the methods left out. msr-compare writes every figure; a section keeps the ones
docs/results.md shows, so a rebuild of unchanged runs rewrites the same files.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

import evidence
import norm_batch_table
from msr_train import compare

OUT = Path("docs/img")
BY_DEPTH = ("--by", "choices.method", "--x", "choices.model", "--baseline", "bn")
CURVES, SWEEP, INIT = ("curves_epoch.png",), ("sweep_choices_model.png",), ("signal_prop_epoch0.png",)


@dataclasses.dataclass(frozen=True)
class Section:
    """One msr-compare over archived runs, into ``OUT / folder``."""
    folder: str
    runs: tuple[Path, ...]
    options: tuple[str, ...]
    figures: tuple[str, ...] = ()   # msr-compare's figures the page shows; the rest are dropped
    left_out: tuple[str, ...] = ()  # "method: why" for each method not in the runs

    def argv(self, out: Path) -> list[str]:
        return [*map(str, self.runs), *self.options, "--out", str(out)]


def at_choice(screen: evidence.Screen, methods: tuple[str, ...],
              extend: bool = True) -> tuple[dict[str, list[Path]], list[str]]:
    """{method: its archived seeds at its screen's choice} (the first grid's choice with
    ``extend`` False) for each method whose seeds are all archived, and a line for each
    method left out."""
    runs, left_out = {}, []
    for method in methods:
        mults, chosen = screen.progress(evidence.ARCHIVE, method, extend)
        if chosen is None:
            left_out.append(f"{method}: its screen has not chosen a rate yet")
            continue
        if chosen == evidence.NO_RATE:
            left_out.append(f"{method}: no screened rate trains ({', '.join(f'{m:g}x' for m in mults)}: each "
                            "diverged or stalled at chance)")
            continue
        found = [evidence.archived_dir(screen.part, screen.name(method, chosen, s)) for s in screen.seeds]
        if None in found:
            done = len(found) - found.count(None)
            left_out.append(f"{method}: {done} of {len(found)} seeds archived at its choice, {chosen:g}x")
        else:
            runs[method] = found
    return runs, left_out


def versus(folder: str, runs: dict[str, list[Path]], left_out: list[str], baseline: str,
           figures: tuple[str, ...] = CURVES) -> Section:
    """Every method's runs against ``baseline``'s; no runs while there is nothing to compare
    (the baseline, or every other method, left out), so the folder says so."""
    comparable = baseline in runs and len(runs) > 1
    return Section(folder, tuple(r for rs in runs.values() for r in rs) if comparable else (),
                   ("--by", "choices.method", "--baseline", baseline), figures, tuple(left_out))


def screened_sections() -> list[Section]:
    """The 10-epoch protocol (at the first grid's choices and at the extended screens'),
    the MSR decision at both, the long protocol and the VGG screens."""
    out = []
    for tag, extend in (("first_grid", False), ("chosen", True)):
        runs, left_out = at_choice(evidence.CONVERGED, evidence.METHODS, extend)
        out.append(versus(f"converged_batch128/{tag}", runs, left_out, "bn"))
        # none's band hides every other line: the page's figure leaves it out
        band = ("none: its band hides every other line",) if "none" in runs else ()
        out.append(Section(f"converged_batch128/{tag}/without_none",
                           tuple(r for m, rs in runs.items() if m != "none" for r in rs), ("--by", "choices.method"),
                           CURVES, (*left_out, *band)))
        runs, left_out = at_choice(evidence.CONVERGED, ("msr_paper", "msr_authors"), extend)
        out.append(versus(f"converged_batch128/{tag}/msr_configs", runs, left_out, "msr_paper", ()))
    runs, left_out = at_choice(evidence.LONG, evidence.LONG_METHODS)
    section = versus("long", runs, left_out, "bn")
    if any(r.parent.name == "default" for r in section.runs):  # the default runs are msr_paper's at 1x (REUSED)
        section = dataclasses.replace(section, options=(*section.options, "--same", "msr=msr_paper"))
    out.append(section)
    for screen in evidence.VGG_SCREENS:
        out.append(versus(f"vgg/{screen.model}", *at_choice(screen, evidence.VGG_SCREEN_METHODS), "bn"))
        # At init the rate plays no part: each method's seed-0 run at 1x of its screen.
        at_init = {m: evidence.archived_dir(screen.part, screen.name(m, 1.0, 0)) for m in evidence.VGG_SCREEN_METHODS}
        out.append(Section(f"vgg/init_{screen.model}", tuple(r for r in at_init.values() if r),
                           ("--by", "choices.method", "--signal-prop"), INIT,
                           tuple(f"{m}: its 1x seed-0 run is not archived" for m, r in at_init.items() if not r)))
    return out


def depth_sections() -> list[Section]:
    """The depth part: the ResNets with and without the half-rate retries, the VGGs at the
    ResNet-20 rate, signal propagation at init, and the default run."""
    depth, retry = evidence.ARCHIVE / "depth", evidence.ARCHIVE / "depth_retry"
    resnets, vggs = sorted(depth.glob("resnet*")), sorted(depth.glob("vgg*"))
    # a retry's rate differs from its group's: --allow-mixed pools it anyway
    out = [Section("depth/with_retries", (*resnets, *sorted(retry.glob("resnet*"))), (*BY_DEPTH, "--allow-mixed"), SWEEP),
           Section("depth/chosen_rate", tuple(resnets), BY_DEPTH),
           Section("depth/vgg", (*vggs, *sorted(retry.glob("vgg*"))), (*BY_DEPTH, "--allow-mixed"), SWEEP)]
    out += [Section(f"depth/init_{model}", tuple(sorted(depth.glob(f"{model}-*-seed0"))),
                    ("--by", "choices.method", "--signal-prop"), INIT)
            for model in ("resnet20", "resnet56", "resnet110", "vgg16")]
    out.append(Section("default", tuple(sorted((evidence.ARCHIVE / "default").glob("seed*"))), ("--by", "method"), CURVES))
    return out


def made_by(section: Section) -> str:
    command = " ".join(["msr-compare", "RUNS", *section.options, "--out", str(OUT / section.folder)])
    lines = [f"# {OUT / section.folder}", "",
             f"Made (with any folder under it) by `python scripts/evidence_tables.py --only {section.folder}` "
             "from the archive:", "",
             f"    {command}", "", f"RUNS ({len(section.runs)}):", ""]
    lines += [f"- {run}" for run in section.runs]
    if section.left_out:
        lines += ["", "Left out:", "", *(f"- {line}" for line in section.left_out)]
    return "\n".join(lines) + "\n"


def build(section: Section) -> None:
    """msr-compare into a scratch folder; only once it succeeded do this section's files
    replace the folder's own (its subfolders, other sections, stay). With no runs, the
    folder holds only made_by.md, saying what is left out."""
    dest = OUT / section.folder
    with tempfile.TemporaryDirectory() as scratch:
        if section.runs:
            try:
                compare.main(section.argv(Path(scratch)))
            except SystemExit as e:
                if e.code:
                    raise SystemExit(f"evidence_tables: {section.folder}: msr-compare refused (its error above); "
                                     "the folder is as it was") from None
        else:
            print(f"{dest}: no runs yet ({'; '.join(section.left_out) or 'none archived'})")
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.iterdir():
            if old.is_file():
                old.unlink()
        for made in Path(scratch).iterdir():
            if made.suffix != ".png" or made.name in section.figures:
                shutil.copyfile(made, dest / made.name)
    (dest / "made_by.md").write_text(made_by(section))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="each section's runs and what is left out, build nothing")
    p.add_argument("--only", metavar="FOLDER", default="", help="the sections whose folder under docs/img starts so")
    args = p.parse_args(argv)
    every = [*screened_sections(), *depth_sections()]
    sections = [s for s in every if s.folder.startswith(args.only)]
    others = [name for name in OTHERS if name.startswith(args.only)]
    if not sections and not others:
        p.error(f"--only {args.only}: no folder starts so; they are: " + ", ".join([s.folder for s in every] + [*OTHERS]))
    for section in sections:
        print(made_by(section)) if args.list else build(section)
    for name in others:
        print(f"# {OUT / name}\n\nMade by {OTHERS[name]}\n") if args.list else build_other(name)
    return 0


#: The outputs msr-compare does not make, and what makes them.
OTHERS = {"norm_batch": "scripts/norm_batch_table.py from docs/evidence/runs/norm_batch",
          "screens.md": "evidence.screen_report: every screen's rates and best validation accuracy"}


def build_other(name: str) -> None:
    if name == "norm_batch":
        norm_batch_table.main(["--out", str(OUT / "norm_batch")])
    else:
        (OUT / "screens.md").write_text(evidence.screen_report(evidence.ARCHIVE) + "\n")


if __name__ == "__main__":
    sys.exit(main())
