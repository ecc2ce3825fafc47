"""`msr-train`: the Hydra entry point. Configs live in conf/ (shipped as msr_train.conf)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from .errors import ConfigError


@hydra.main(version_base="1.3", config_path="pkg://msr_train.conf", config_name="config")
def _run(cfg) -> float | None:
    from .train import train  # torch is imported only once Hydra has parsed the command line
    try:
        summary = train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as e:
        print(f"msr-train: error: {e}", file=sys.stderr)
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise  # let the sweep record this job as failed and go on
        sys.exit(2)
    # Returned to Hydra's sweepers (e.g. Optuna) as the objective.
    return summary["final_test_acc"]


def main() -> None:
    _run()


if __name__ == "__main__":
    main()
