#!/usr/bin/env python
"""Fill ray_cluster.yaml's REPLACE-<Name> placeholders from the CloudFormation stack of
infra/aws/spot-cluster.cfn.yaml, and pin the AMI (resolved once, so head and workers get the same driver).

    python infra/aws/render_cluster_config.py --stack spot-ray --region us-east-1 \
        --out ~/.spot/ray_cluster.yaml
    ray up ~/.spot/ray_cluster.yaml        # from the repo root (file_mounts sync "." to the nodes)

Every placeholder must be filled: a name the stack does not output is an error, not a silent leftover.

Multi-node runs: `--multi-node N` enables only the node type in the stack's cluster placement group (one
zone, one instance type) with up to N nodes and disables the other GPU types, so the autoscaler cannot
give one run nodes of two zones or two instance types. That file is written without the comments of
ray_cluster.yaml (they stay there).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLACEHOLDER = re.compile(r"REPLACE-([A-Za-z0-9]+)")
# The AWS Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04): Docker, NVIDIA driver >= 580,
# NVIDIA container toolkit, EFA driver, AWS CLI v2.
AMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"


def placeholders(text: str) -> list[str]:
    """The distinct placeholder names of a config, in order of appearance."""
    return list(dict.fromkeys(PLACEHOLDER.findall(text)))


def render(text: str, values: dict[str, str]) -> str:
    """text with every REPLACE-<Name> replaced by values[Name]; KeyError names the missing ones."""
    missing = [name for name in placeholders(text) if name not in values]
    if missing:
        raise KeyError(f"no value for {', '.join('REPLACE-' + m for m in missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def multi_node(text: str, nodes: int) -> str:
    """A rendered config in which only the placement-group node type (up to `nodes` nodes) launches
    workers; ValueError unless exactly one type has a placement group."""
    import yaml

    config = yaml.safe_load(text)
    types = config["available_node_types"]
    grouped = [name for name, t in types.items() if t["node_config"].get("Placement", {}).get("GroupName")]
    if len(grouped) != 1:
        raise ValueError(f"--multi-node needs exactly one node type with a placement group, found {grouped}")
    for name, node_type in types.items():
        if name != config["head_node_type"]:
            node_type["min_workers"] = 0
            node_type["max_workers"] = nodes if name == grouped[0] else 0
    config["max_workers"] = max(config["max_workers"], nodes)
    header = (f"# From ray_cluster.yaml by render_cluster_config.py --multi-node {nodes}: workers of\n"
              f"# node type {grouped[0]} only (one placement group, one zone, one instance type).\n"
              "# The comments that explain each field are in ray_cluster.yaml.\n")
    return header + yaml.safe_dump(config, sort_keys=False, width=110)


def stack_values(stack: str, region: str, ami: str | None = None) -> dict[str, str]:
    """The stack's outputs, plus AmiId: `ami` when given, else the current one of the public SSM parameter."""
    import boto3

    (described,) = boto3.client("cloudformation", region_name=region).describe_stacks(StackName=stack)[
        "Stacks"
    ]
    values = {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}
    if ami is None:
        ssm = boto3.client("ssm", region_name=region)
        ami = ssm.get_parameter(Name=AMI_PARAMETER)["Parameter"]["Value"]
    values["AmiId"] = ami
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stack", default="spot-ray")
    p.add_argument("--region", required=True)
    p.add_argument("--config", type=Path, default=REPO / "ray_cluster.yaml")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--ami", help="an AMI id to use instead of the current one (e.g. the one of a running cluster)"
    )
    p.add_argument("--multi-node", type=int, metavar="N",
                   help="workers only of the placement-group node type, up to N nodes (see above)")
    args = p.parse_args(argv)
    if args.multi_node is not None and args.multi_node < 2:
        p.error(f"--multi-node {args.multi_node}: a multi-node run needs at least 2 nodes")
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        values = stack_values(args.stack, args.region, args.ami)
    except (BotoCoreError, ClientError) as err:
        print(f"render_cluster_config.py: stack {args.stack} in {args.region}: {err}", file=sys.stderr)
        return 2
    try:
        text = render(args.config.read_text(), values)
        if args.multi_node:
            text = multi_node(text, args.multi_node)
    except (KeyError, ValueError) as err:
        print(f"render_cluster_config.py: {err.args[0]}", file=sys.stderr)
        return 2
    out = args.out.expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} (AMI {values['AmiId']}); start the cluster from the repo root: ray up {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
