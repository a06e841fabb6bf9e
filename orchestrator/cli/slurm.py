"""The two commands a SLURM job of `msx launch --cluster slurm.yaml` runs inside its allocation (hidden: the batch
script and its job steps call them, not users; orchestrator/cluster/slurm.py)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("slurm-job", hidden=True)
@click.argument("record", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def slurm_job(record: Path) -> None:
    """The batch step: Ray's head, a Ray worker per node (job steps), the study's driver."""
    from ..cluster.jobs import SubmissionError
    from ..cluster.slurm import run_job

    try:
        status = run_job(record, click.echo)
    except (RuntimeError, SubmissionError) as error:  # Ray did not come up in the allocation
        click.echo(f"msx slurm-job: {error}")
        status = 1
    raise SystemExit(status)


@click.command("slurm-node", hidden=True)
@click.option("--address", required=True, help="The head's GCS address, HOST:PORT.")
@click.option("--node-ip", required=True, help="This node's address as SLURM reaches it.")
def slurm_node(address: str, node_ip: str) -> None:
    """A worker step: this node's Ray worker with the CPUs and GPUs SLURM gave the step."""
    from ..cluster.slurm import run_node

    raise SystemExit(run_node(address, node_ip, click.echo))
