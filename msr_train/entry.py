"""The console scripts' first code. Their imports take seconds (Hydra, torch), and a stop
signal in that time, or outside the training loop (which takes the signals over, see
train.StopSignal), or a second Ctrl-C, must end the process cleanly: one line, exit 130,
no traceback. A background thread that fails (TensorBoard's writer in a folder gone
read-only) is one line too: the main thread, whose writes fail the same way, says what to
do. Each tool's own module is imported only once the handlers are in place."""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from functools import partial

from .errors import describe  # imports nothing: the handlers still come first

#: Stop signals that, outside the loop, end the process as Ctrl-C does.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


#: Stop signals received outside the loop. Library code can swallow the KeyboardInterrupt
#: (an import's ``except BaseException``): the loop then stops at its first step.
RECEIVED: list[str] = []


def interrupted_outside_the_loop(signum, frame):
    RECEIVED.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(RECEIVED[-1])


#: Not a cluster's handler that StopSignal.hand_over must call once the run has stopped.
interrupted_outside_the_loop.not_handed_over = True


def thread_failed(tool: str, args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    print(f"{tool}: warning: a background thread ({name}) failed: {describe(args.exc_value)}", file=sys.stderr)


def guarded(tool: str, module: str) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, interrupted_outside_the_loop)
    threading.excepthook = partial(thread_failed, tool)
    try:
        importlib.import_module(module).main()
    except KeyboardInterrupt as e:
        print(f"{tool}: stopped by {str(e) or 'a signal'} (outside a training step, or a second signal); everything "
              "saved so far is intact", file=sys.stderr)
        sys.exit(130)


def msr_train() -> None:
    guarded("msr-train", "msr_train.cli")


def msr_compare() -> None:
    guarded("msr-compare", "msr_train.compare")


def msr_eval() -> None:
    guarded("msr-eval", "msr_train.eval_cli")
