"""The names of a run folder's files, in one place (torch-free: msr-compare reads them
without loading torch).

    <run dir>/metrics.jsonl       one record per evaluation (run_log.RunLog)
    <run dir>/summary.json        the run's outcome (train.Run.summarise)
    <run dir>/signal_prop.jsonl   signal propagation records (signal_prop)
    <run dir>/checkpoints/        last.pt, prev.pt, best.pt (checkpoint, state)
    <run dir>/run.lock            who trains in the folder (run_lock)
    <run dir>/eval_*.json         msr-eval's results (eval_cli)
"""

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
SIGNAL_PROP = "signal_prop.jsonl"
CHECKPOINTS = "checkpoints"
LOCK = "run.lock"
