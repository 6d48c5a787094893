"""The sweep's options, declared once: its own (:class:`SweepOptions`) and the fine-tuning options it
passes to every trial (fields of :class:`pipelines.training.config.RunConfig`; without ``--data``, the
built-in source's preset, :func:`builtin_sweep`).
``build_parser`` generates the command line of ``tuning/sweep_lambdas.py`` from both."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from pipelines.training.config import BUILTIN_FINETUNE, RUNS_DIR, RunConfig, add_field, option
from pipelines.utils.cli import Parser
from tuning import space

EXPERIMENT = "spot-sweep"
SEARCHERS = ("tpe", "random")

# Fine-tuning options on the sweep's command line (the rest via --finetune-config).
TRAIN_FLAGS = ("data", "source", "backbone", "pretrained", "epochs", "batch_size", "img_size", "model_args",
               "num_workers", "gpus_per_worker", "cpus_per_worker", "seed", "register_as", "verbose")
TRAIN_HELP = {  # where the sweep's help differs from the fine-tuning job's
    "epochs": "epochs per trial (ASHA's max) [default: with --data the fine-tuning default; without, the "
              "--source's fine-tuning epochs, as make demo runs them]",
    "num_workers": "Ray Train workers per trial [default: 2; without --data: 1]",
    "seed": "seed of the training runs and the searcher [default: 0]",
    "verbose": "show Ray's and Tune's own log lines and every trial's per-epoch lines too",
}
SEARCH_HELP = {
    "lambda_rate": "l1, weight of the keep-rate loss", "lambda_kl": "l2, weight of the KL to the teacher",
    "lambda_token": "l3, weight of the token cosine loss", "lr": "backbone learning rate",
    "predictor_lr": "learning rate of the relevance modules", "rho": "token retention rate in (0, 1]",
}
RESUME_OPTIONS = ("resume", "address")


@dataclass
class SweepOptions:
    """What the sweep itself is: searcher, scheduler, budget, and where it is recorded."""

    space: str = option(str(space.DEFAULT_SPACE), "search-space file [default: tuning/search_space.yaml]",
                        metavar="FILE.yaml")
    num_samples: int = option(8, "trials", metavar="N")
    max_concurrent: int | None = option(
        None, "trials at once [default: what the cluster fits: GPUs (CPUs without GPUs) / (workers x GPUs "
        "(CPUs) per worker)]", metavar="N",
    )
    searcher: str = option("tpe", "Optuna TPE (random for its first 10 trials) or random search",
                           choices=SEARCHERS)
    grace_period: int = option(1, "epochs every trial runs before ASHA may stop it", metavar="EPOCHS")
    reduction_factor: float = option(2.0, "ASHA keeps 1/F of the trials at each rung", metavar="F")
    gmacs_budget: float | None = option(
        None, "GMACs per image (the paper's \"GFLOPs\") a model may cost: the rho range is clipped to fit "
        "and the best feasible trial is registered [default: none, search the trade-off] (--gflops-budget: "
        "its former name)", metavar="G", flags=("--gmacs-budget", "--gflops-budget"),
    )
    budget_clip: bool = option(True, "clip the rho range to the budget; without, trials over it run but are "
                               "infeasible (objective = accuracy - 1, never registered)")
    finetune_config: str | None = option(
        None, "any other fine-tuning options (pipelines/finetune.py --config format); the search space and "
        "the flags above win", metavar="FILE.yaml",
    )
    name: str | None = option(None, "sweep name = its directory in --storage [default: "
                              "sweep-<backbone>-<time>]", metavar="NAME")
    resume: str | None = option(None, "continue the interrupted sweep in PATH (<storage>/<name>) where it "
                                "stopped; takes no other option but --address", metavar="PATH")


def builtin_sweep(source: str) -> dict:
    """Without --data: a small sweep that fine-tunes SPOT from the built-in ``source``'s dense model
    (tuning.sweep.digits_teacher) on two CPU cores: ``make demo``'s fine-tuning recipe for that source
    (``BUILTIN_FINETUNE``; its learning rates are searched), one worker a trial."""
    recipe = BUILTIN_FINETUNE[source]
    return {**{k: v for k, v in recipe.items() if k not in space.SEARCHABLE}, "num_workers": 1}


def build_parser(description: str, epilog: str) -> argparse.ArgumentParser:
    parser = Parser(prog="sweep_lambdas", description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    own = {f.name: f for f in fields(SweepOptions)}

    def add_own(group, name: str) -> None:
        extra = {"choices": own[name].metadata["choices"]} if own[name].metadata["choices"] else {}
        shown = {"help": own[name].metadata["help"]} if name == "space" else {}
        add_field(group, SweepOptions, name, default=own[name].default, **extra, **shown)

    group = parser.add_argument_group("search space")
    add_own(group, "space")
    for key, text in SEARCH_HELP.items():
        group.add_argument(space.flag(key), dest=key, metavar="SPEC", help=f"{text} [default: from --space]")
    group = parser.add_argument_group("search")
    for name in ("num_samples", "max_concurrent", "searcher", "grace_period", "reduction_factor",
                 "gmacs_budget", "budget_clip"):
        add_own(group, name)
    group = parser.add_argument_group("each trial (fine-tuning options, see pipelines/finetune.py --help)")
    for name in TRAIN_FLAGS:
        add_field(group, RunConfig, name, **({"help": TRAIN_HELP[name]} if name in TRAIN_HELP else {}))
    add_own(group, "finetune_config")
    group = parser.add_argument_group("where")
    add_field(group, RunConfig, "address")
    add_field(group, RunConfig, "storage",
              help=f"sweep and Train run storage: local dir, s3://, gs://, NFS [default: ./{RUNS_DIR}]")
    add_field(group, RunConfig, "shared_storage")
    add_own(group, "name")
    add_field(group, RunConfig, "experiment", default=EXPERIMENT,
              help=f"MLflow experiment [default: {EXPERIMENT}]")
    add_field(group, RunConfig, "mlflow_uri")
    add_own(group, "resume")
    return parser
