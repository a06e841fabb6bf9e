"""`msx launch` in this process: everything checked before Ray starts, then Ray and the study.

The checks, in order: the spec (or the study to resume, with its own spec and data), the cohort against its folds,
the data's fingerprint (a resumed study must read the same data), and the tracking store. Bad input raises a
ValueError (or a ConnectionError for a store that does not answer) naming what is wrong, before anything expensive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from msx.models.data.cohort import Cohort
from msx.models.data.folds import resolve_folds

from ..spec import ExperimentSpec, load_spec, spec_from_dict
from ..tracking.provenance import Provenance, study_provenance
from ..tracking.store import check_tracking_server, default_tracking_uri
from .cohort import prepare_cohort
from .state import RESUMABLE, StudyState, find_study, unfinished_study


@dataclass(frozen=True)
class LaunchPlan:
    """A study ready to run: checked spec and cohort, the data's provenance, the store it records to, and the
    unfinished study it continues (None: a new one)."""

    spec: ExperimentSpec
    cohort: Cohort
    provenance: Provenance
    storage: Path
    tracking_uri: str
    resume: StudyState | None


def plan_launch(
    space: str | None,
    data: Path | None,
    storage: Path,
    tracking_uri: str | None,
    resume_name: str | None,
    fresh: bool,
    echo: Callable[[str], None],
) -> LaunchPlan:
    """Check everything a launch needs, before Ray. ``resume_name`` names a study to continue; without it an
    unfinished study of the same spec and data is continued unless ``fresh``."""
    if resume_name:
        resume = resumable(find_study(storage, resume_name))
        spec = spec_from_dict(resume.spec, f"study record of {resume.study}")
        data = data or Path(resume.data_root)
    else:
        spec = load_spec(space or "smoke")
        resume = None if fresh else unfinished_study(storage, spec.name)
        if resume is not None:
            resume = auto_resumable(resume, spec, data, echo)
    storage.mkdir(parents=True, exist_ok=True)
    cohort = prepare_cohort(spec, data, storage, echo)
    # Before Ray: the files the trials will read, as they are now.
    provenance = study_provenance(cohort, resolve_folds(spec.data.folds, cohort.patients))
    if resume is not None:
        if provenance.data_fingerprint != resume.data_fingerprint:
            raise ValueError(
                f"{cohort.root}: the data changed since study {resume.study} started (fingerprint "
                f"{resume.data_fingerprint} then, {provenance.data_fingerprint} now); its trials would not compare. "
                "Restore the data, or start a new study with --fresh"
            )
        if tracking_uri and tracking_uri != resume.tracking_uri:
            raise ValueError(
                f"study {resume.study} records to {resume.tracking_uri}; leave out --tracking-uri to resume it"
            )
        tracking_uri = resume.tracking_uri
    tracking_uri = tracking_uri or default_tracking_uri(storage)
    check_tracking_server(tracking_uri)
    return LaunchPlan(spec, cohort, provenance, storage, tracking_uri, resume)


def resumable(state: StudyState) -> StudyState:
    """The study named by --resume, if it can be taken over."""
    if state.status not in RESUMABLE:
        raise ValueError(
            f"study {state.study} already ended ({state.status}); there is nothing to resume (msx status {state.study})"
        )
    if state.driver_alive():
        raise ValueError(
            f"study {state.study} is still running (driver pid {state.driver_pid}); "
            f"watch it with `msx status {state.study}`"
        )
    return state


def auto_resumable(
    state: StudyState, spec: ExperimentSpec, data: Path | None, echo: Callable[[str], None],
) -> StudyState:
    """An unfinished study of this experiment that a plain `msx launch` takes over: only the same spec and data."""
    if state.driver_alive():
        raise ValueError(
            f"study {state.study} of experiment {spec.name!r} is still running (driver pid {state.driver_pid}); "
            f"watch it with `msx status {state.study}`, or start another one alongside with --fresh"
        )
    same_data = data is None or Path(data).absolute() == Path(state.data_root) or not state.data_root
    if state.spec != spec.to_dict() or not same_data:
        raise ValueError(
            f"experiment {spec.name!r} has an unfinished study {state.study} with another spec or data: "
            f"`msx launch --resume {state.study}` continues it, `msx launch --fresh ...` starts a new study"
        )
    echo(f"resuming the unfinished study {state.study} (--fresh starts a new one instead)")
    return resumable(state)
