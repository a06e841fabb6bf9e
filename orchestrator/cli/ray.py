"""`msx ray stop`: the local Ray that the studies on this machine share."""

from __future__ import annotations

import click

from .options import fail_cleanly


@click.group(name="ray")
def ray_group() -> None:
    """The local Ray that the studies on this machine share."""


@ray_group.command("stop")
def ray_stop() -> None:
    """Stop the local Ray msx started, unless a study still uses it (the last study to end stops it anyway;
    this is for a Ray left behind by a driver that was killed)."""
    from ..cluster.local_ray import LocalRayError, stop_if_unused

    try:
        stopped = stop_if_unused()
    except LocalRayError as error:
        raise fail_cleanly(error) from None
    click.echo("stopped the local Ray" if stopped else "no local Ray started by msx runs on this machine")
