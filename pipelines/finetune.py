#!/usr/bin/env python
"""Distributed SPOT fine-tuning on Ray Train (PyTorch DDP), tracked and registered in MLflow: the main job.

    python pipelines/finetune.py                      # built-in digits data on the CPU, a few minutes
    python pipelines/finetune.py --dense              # the same, dense backbone (baseline / teacher)
    python pipelines/finetune.py --backbone lvvit_s --data /data/imagenet-shards --pretrained lvvit_s.pth \\
        --address auto --num-workers 16 --gpus-per-worker 1 --cpus-per-worker 10 \\
        --storage s3://bucket/spot-runs --mlflow-uri http://head:5000

The options are :class:`pipelines.training.config.RunConfig`'s; the job is
:func:`pipelines.training.job.run`. The last line
printed is ``RESULT_JSON: {...}``. Bad input exits with code 2 and one line on stderr; a failed training
run with code 1; Ctrl-C, SIGTERM or SIGHUP with 128 + the signal (130, 143, 129) after printing the command
that resumes the run; a run whose MLflow server was still down at its end with 75 after printing the
command that finishes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray.train import TrainingFailedError

from pipelines.data.manifest import DataError
from pipelines.tracking.uri import move_credentials_to_env
from pipelines.training.config import add_options, given_values, make_builtin_data, resolve_config
from pipelines.training.job import run
from pipelines.training.trainer import failure_cause
from pipelines.utils import signals
from pipelines.utils.cli import Parser, bad_input, failed, print_result
from pipelines.utils.errors import (
    Interrupted,
    RayStartError,
    TrackingError,
    TrackingOutage,
    TrainingError,
    first_line,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="finetune",
        description="SPOT fine-tuning on Ray Train with MLflow tracking and registry.",
        epilog="examples:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser)
    return parser


def interrupted_line(err: Interrupted) -> str:
    """What a stopped run left, in one sentence: its MLflow run's state and its checkpoints."""
    state = ("MLflow run marked KILLED" if err.marked else
             "MLflow run not marked KILLED (MLflow could not record it; it shows RUNNING until a --resume)")
    kept = ("no checkpoint yet (it starts again at epoch 1)" if err.checkpoints == 0
            else "its checkpoints kept")  # an epoch ending as the run stops may still add one
    return f"interrupted ({signals.name()}); {state}, {kept}."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        given = given_values(args)
        given = given.with_options(mlflow_uri=move_credentials_to_env(given.mlflow_uri))
        make_builtin_data(given)
        with signals.stop_signals():
            result = run(resolve_config(given))
    except (DataError, FileNotFoundError, TrackingError, ValueError) as err:
        return bad_input("finetune", err)
    except Interrupted as err:
        print(f"finetune: {interrupted_line(err)} Continue with:\n  {err}", file=sys.stderr)
        return signals.exit_code()
    except KeyboardInterrupt:  # before the run started: nothing recorded, nothing to continue
        print(f"finetune: interrupted ({signals.name()}) before the run started; nothing recorded",
              file=sys.stderr)
        return signals.exit_code()
    except RayStartError as err:  # before the run started: nothing recorded
        return failed("finetune", err)
    except TrackingOutage as err:  # trained; MLflow down at the end: the message says how to finish later
        print(f"finetune: {err}", file=sys.stderr)
        return 75
    except TrainingError as err:  # stopped for good (non-finite loss): the message says where
        print(f"finetune: training failed: {first_line(err)}", file=sys.stderr)
        return 1
    except TrainingFailedError as err:  # the workers failed --max-failures + 1 times: say why
        print(f"finetune: training failed: {failure_cause(err)}", file=sys.stderr)
        return 1
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
