"""What the benchmarks share: device choice, synchronised clocks, the result table and the JSON record.

Only torch and the standard library: the benchmarks must run on a GPU machine that has no Ray or MLflow.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import torch


def pick_device(name: str, cpu_threads: int | None = None) -> torch.device:
    """The device named; on the CPU, with ``cpu_threads`` torch threads when given."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU")
    if device.type == "cpu" and cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device, so that a clock read afterwards covers all the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds that `work` takes, the device's queue drained before and after; and what it returned."""
    synchronize(device)
    start = time.perf_counter()
    result = work()
    synchronize(device)
    return time.perf_counter() - start, result


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table, so that it can be pasted into docs/BENCHMARKS.md as it is."""
    cells = [[_cell(value) for value in row] for row in rows]
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in cells:
        print("| " + " | ".join(row) + " |")


def write_json(path: str | None, device: torch.device, settings: dict[str, Any], results: Any) -> None:
    if path is None:
        return
    record = {
        "date": date.today().isoformat(),
        "device": device_description(device),
        "torch": torch.__version__,
        "settings": settings,
        "results": results,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
