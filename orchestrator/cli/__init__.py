"""The `msx` command line: one module per command (group), each parsing its options, calling the stage that does
the work and printing what came back. Nothing here decides anything about a study."""

from __future__ import annotations

import click

from .data import data, synth
from .evaluate import evaluate
from .fidelity import fidelity
from .launch import launch, status
from .predict import predict
from .ray import ray_group
from .registry import registry
from .report import report
from .slurm import slurm_job, slurm_node
from .ui import ui


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """msx: diffusion MS lesion segmentation studies on Ray Tune, Ray Train and MLflow."""


for command in (
    launch, status, synth, evaluate, registry, report, ui, predict, data, fidelity, ray_group, slurm_job, slurm_node
):
    main.add_command(command)
