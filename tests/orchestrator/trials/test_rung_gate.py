"""The rung gate on a real local Ray: a worker waits after its rung report until the driver lets its trial pass."""

import threading
import time

import pytest

from msx.orchestrator.trials.rung_gate import RungWaiter, gate_name, open_gate, start_rung_gate

pytestmark = pytest.mark.integration


def test_a_worker_waits_at_its_rungs_only_until_the_driver_opens_the_gate(local_ray):
    name = gate_name("gate-test")
    gate = start_rung_gate(name)  # noqa: F841 (held while the test runs, as the driver holds it)
    waiter = RungWaiter(name, "t_1", rungs=(2, 4), run_name="unet-c1-fold1")
    passed = []

    waiter.after_report(1)  # not a rung: no wait
    worker = threading.Thread(target=lambda: (waiter.after_report(2), passed.append(2)))
    worker.start()
    time.sleep(1.0)
    assert passed == [] and worker.is_alive()  # held at the rung
    open_gate("t_2", 2)  # another trial's go-ahead is not this one's
    time.sleep(0.5)
    assert passed == []
    open_gate("t_1", 2)
    worker.join(timeout=10)
    assert passed == [2]
    waiter.after_report(2)  # a replayed report at a rung already passed: no wait
    open_gate("t_1", 4)
    waiter.after_report(4)


def test_without_a_gate_or_rungs_a_worker_never_waits(local_ray):
    start_rung_gate(None)
    open_gate("t_1", 2)  # a study without rungs: nothing to open
    RungWaiter("msx-rung-gate-no-such-study", "t_1", rungs=(2,)).after_report(2)
    RungWaiter(None, "t_1", rungs=(2,)).after_report(2)
    RungWaiter(gate_name("gate-test-2"), "t_1", rungs=()).after_report(2)
