"""`pyddl train`: the reference distributed trainer (small CNN on digits by default).

Outside a job, `pyddl train -np N` checks its inputs once, then starts N local workers through
the launcher (each runs pyddl.train.worker; with -H the servers' workers check the inputs);
inside a job (`pyddl run`, torchrun, srun, mpirun) it trains on that job's ranks. Flags are
pyddl run's job flags plus TrainConfig's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from pyddl import env as _env
from pyddl.cli.run import add_job_flags, config_from_args as run_config_from_args, launch_mode, run_through_srun
from pyddl.launch.config import LaunchError
from pyddl.launch.local import launch
from pyddl.train.config import TrainConfig, add_train_arguments, config_from_args

__all__ = ["register"]

_EXAMPLES = """\
Examples:
  pyddl train                                   # 2 workers, small CNN on digits, under a minute
  pyddl train -np 4 --epochs 10 --batch-size 16 --warmup-epochs 2
  pyddl train --stop-after-epoch 2 --out runs/a  &&  pyddl train --resume --out runs/a
  pyddl train -np 8 --model resnet50 --data /data/imagenet --epochs 90 --decay step \\
      --milestones 30,60,80 --topology 4x2 --allreduce multiring --compression fp16
  srun -N 16 --ntasks-per-node 4 pyddl train --model resnet50 --data /data/imagenet ...
The large-batch experiment (32 vs 256): python -m pyddl.train.experiment
"""


def _fail(message: str, code: int = 2) -> int:
    print(f"pyddl train: {message}", file=sys.stderr)
    return code


def _main(args) -> int:
    from pyddl.train import worker
    from pyddl.train.trainer import check_inputs, new_out_dir

    # As `pyddl run` decides: inside a job's rank (pyddl run, torchrun, an srun task, an mpirun
    # rank) train as that rank; in an sbatch/salloc allocation with no job step, start one srun
    # task per rank; otherwise launch -np local workers (or -H servers).
    mode = "rank" if "RANK" in os.environ else launch_mode(args)
    try:
        if mode is not None and args.nproc is None:
            args.nproc = _env.read_job_env().world_size  # the scheduler's ranks, for validation
        cfg = config_from_args(args)
    except (ValueError, TypeError) as err:
        return _fail(str(err))
    if mode == "rank":
        return worker.run(cfg, timeout_s=args.timeout, chunk_bytes=args.chunk_bytes)
    try:
        if not (args.hosts or args.hostfile):
            # With -H the data and --out live on the servers, not necessarily here: there
            # the workers check them, and a bad input ends the job with their message and 2.
            check_inputs(cfg)
        if mode == "allocation":
            return run_through_srun("train")
    except (ValueError, ImportError) as err:
        return _fail(str(err))
    if cfg.out is None and cfg.checkpoint_dir is None:
        # Named here, not by the workers, so that workers restarted by --max-restarts find
        # the checkpoints of the attempt before them.
        try:
            cfg = dataclasses.replace(cfg, out=str(new_out_dir(cfg)))
        except OSError as err:
            return _fail(f"cannot create an output folder under ./runs ({err.strerror}); pass --out DIR "
                         f"with a folder you can write to")
    command = (sys.executable, "-m", "pyddl.train.worker", "--config-json",
               json.dumps(cfg.to_dict()))
    if args.nproc is None and not (args.hosts or args.hostfile):
        args.nproc = cfg.workers  # no -np: the config's default of 2 local workers
    try:
        # The job flags (-np, --topology, --allreduce, --timeout, ...) mean what they mean
        # for `pyddl run`; the same values are in cfg for the workers.
        launch(run_config_from_args(args, command))
    except ValueError as err:
        return _fail(str(err))
    except LaunchError as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    return 0


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `pyddl train`'s flags (job flags + TrainConfig's) to `parser` and return it."""
    add_job_flags(parser)  # no -np: TrainConfig's 2 workers, or the scheduler's ranks
    add_train_arguments(parser)
    return parser


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model on N workers with the large-minibatch recipe",
        description="Synchronous data-parallel training with the large-minibatch recipe "
        "(Goyal et al. 2017). With no arguments: 2 local workers, a small CNN on scikit-learn's "
        "digits, test accuracy above 0.95 in under a minute on 2 CPU cores.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build_parser(parser)
    parser.set_defaults(func=_main)
