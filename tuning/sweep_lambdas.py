#!/usr/bin/env python
"""Ray Tune sweep over SPOT's loss weights, learning rates and retention rate; each trial a Ray Train run.

    python tuning/sweep_lambdas.py                                  # built-in digits on the CPU, minutes
    python tuning/sweep_lambdas.py --gmacs-budget 0.03 --rho 0.2:1   # best model within a budget
    python tuning/sweep_lambdas.py --data /data/imagenet-shards --backbone deit_s \\
        --pretrained deit_small_patch16_224.pth --epochs 30 --num-samples 32 --num-workers 8 \\
        --gpus-per-worker 1 --cpus-per-worker 10 --address auto --storage s3://bucket/sweeps \\
        --mlflow-uri http://head:5000
    python tuning/sweep_lambdas.py --resume ray_results/sweep-deit_t-20260101-120000

Options: :mod:`tuning.options`; the sweep: :mod:`tuning.sweep`. The last line printed is
``RESULT_JSON: {...}``. Bad input exits with code 2 and one line on stderr; an interrupted sweep (Ctrl-C,
SIGTERM, SIGHUP) with 128 + the signal (130, 143, 129) after marking its MLflow runs KILLED and printing
the one command that continues it; a sweep without any result with 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.tracking.uri import move_credentials_to_env
from pipelines.utils import signals
from pipelines.utils.cli import bad_input, failed, print_result
from pipelines.utils.errors import ConfigError, RayStartError, TrackingError, check
from tuning import options
from tuning.sweep import SweepError, SweepInterrupted, prepare, sweep

SPACE_HELP = (
    "\n\nsearch space: a YAML file (--space) of fine-tuning options, each a number (fixed) or\n"
    "{distribution: uniform|loguniform, low: L, high: H}; SPEC overrides one option: VALUE (fixed),\n"
    "LOW:HIGH (the file's distribution) or DISTRIBUTION:LOW:HIGH. Without --pretrained there is no\n"
    "teacher, so the file's lambda_kl and lambda_token are fixed at 0."
)


def build_parser():
    return options.build_parser(
        "Ray Tune sweep of SPOT fine-tuning (loss weights, learning rates, rho) with MLflow.",
        "examples:\n" + __doc__.split("\n\n")[1] + SPACE_HELP,
    )


def interrupted_line(err: SweepInterrupted) -> str:
    """What a stopped sweep left, in one sentence: its and its running trials' MLflow runs' state."""
    state = (f"MLflow runs of the sweep and of its {err.trials} running trial(s) marked KILLED" if err.marked
             else "MLflow runs of the sweep and of its running trials not all marked KILLED (MLflow could "
             "not record it; they show RUNNING until a --resume)")
    return f"interrupted ({signals.name()}); {state}, finished trials and checkpoints kept."


def main(argv: list[str] | None = None) -> int:
    cli = build_parser()
    args = cli.parse_args(argv)
    args.mlflow_uri = move_credentials_to_env(args.mlflow_uri)
    try:
        if args.resume:
            allowed = options.RESUME_OPTIONS
            extra = [k for k, v in vars(args).items() if k not in allowed and v != cli.get_default(k)]
            check(not extra, f"--resume continues a sweep as it was started; remove {', '.join(extra)}",
                  SweepError)
        plan = prepare(args, Path.cwd())
    except (ValueError, FileNotFoundError, TrackingError) as err:
        return bad_input("sweep_lambdas", err)
    for note in plan["notes"]:
        print(f"note: {note}", flush=True)
    try:
        with signals.stop_signals():
            result = sweep(plan, args.address)
    except (SweepError, ConfigError) as err:  # the cluster cannot run a trial, or cannot read --storage
        return bad_input("sweep_lambdas", err)
    except RayStartError as err:
        return failed("sweep_lambdas", err)
    except SweepInterrupted as err:
        print(f"sweep_lambdas: {interrupted_line(err)} Continue with:\n  {err}", file=sys.stderr, flush=True)
        return signals.exit_code()
    except KeyboardInterrupt:  # before the sweep's MLflow run existed: nothing recorded
        print(f"sweep_lambdas: interrupted ({signals.name()}) before the sweep started; nothing recorded",
              file=sys.stderr, flush=True)
        return signals.exit_code()
    print_result(result)
    return 0 if result["best_trial"] is not None else 1


if __name__ == "__main__":
    from tuning.sweep_lambdas import main as _main  # trials and callbacks pickle by module, not __main__

    sys.exit(_main())
