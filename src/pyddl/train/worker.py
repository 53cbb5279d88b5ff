"""One worker of `pyddl train`: `python -m pyddl.train.worker --config-json JSON`.

`pyddl train -np N` starts N of these through the launcher with the whole TrainConfig as
JSON (flags are parsed once, in the launcher); `pyddl train` inside a job calls `run` directly.
Job settings (topology, algorithm, timeout) come from the PYDDL_* variables or the arguments.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys


def _exit_quietly(signum, frame):
    # The launcher forwards Ctrl-C (SIGINT) to every worker and says itself, in one line, that
    # the run was interrupted: a SystemExit unwinds like KeyboardInterrupt, without a
    # traceback per rank.
    raise SystemExit(128 + signum)


if __name__ == "__main__":  # before the heavy imports below, which a Ctrl-C may interrupt
    signal.signal(signal.SIGINT, _exit_quietly)

import pyddl  # noqa: E402
from pyddl.errors import PyddlError  # noqa: E402
from pyddl.train.config import TrainConfig  # noqa: E402
from pyddl.train.trainer import backend_for, train  # noqa: E402

__all__ = ["main", "run"]

# Exit codes: bad input (the user can fix the command) vs. a failure during the run.
EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


def run(cfg: TrainConfig, *, timeout_s: float | None = None,
        chunk_bytes: int | None = None) -> int:
    """Join the job, train `cfg`, leave the job (unless the caller had joined it already);
    print a one-line error instead of a traceback.

    Args:
        cfg: the run's settings.
        timeout_s, chunk_bytes: pyddl.init's settings (default: PYDDL_TIMEOUT, ...).

    Returns:
        0 on success, 2 for bad input (data, model, batch, checkpoints), 1 when the run failed
        (non-finite loss, a collective error).
    """
    owns = not pyddl.is_initialized()
    try:
        pyddl.init(topology=cfg.topology, allreduce=cfg.allreduce, timeout_s=timeout_s,
                   chunk_bytes=chunk_bytes, backend=backend_for(cfg.device))
        train(cfg)
    except (ValueError, TypeError, ImportError) as exc:
        print(f"pyddl train: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except PyddlError as exc:
        print(f"pyddl train: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    finally:
        if owns:
            pyddl.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyddl.train.worker", allow_abbrev=False,
                                     description="one worker of `pyddl train` (started by it)")
    parser.add_argument("--config-json", required=True, metavar="JSON",
                        help="TrainConfig.to_dict() as JSON")
    args = parser.parse_args(argv)
    try:
        cfg = TrainConfig(**json.loads(args.config_json))
    except (ValueError, TypeError) as exc:
        print(f"pyddl train: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
