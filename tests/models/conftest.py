import numpy as np
import pytest


class Agreement:
    """Checks msx values against a reference within a tolerance and keeps the largest difference per quantity."""

    def __init__(self) -> None:
        self.largest: dict[str, float] = {}

    def check(self, quantity: str, msx_value, reference, tolerance: float) -> None:
        msx_value = np.asarray(msx_value, dtype=float)
        reference = np.asarray(reference, dtype=float)
        assert msx_value.shape == reference.shape, f"{quantity}: shape {msx_value.shape} != {reference.shape}"
        assert np.array_equal(np.isnan(msx_value), np.isnan(reference)), f"{quantity}: NaN where the other is not"
        difference = float(np.abs(msx_value - reference)[~np.isnan(reference)].max(initial=0.0))
        self.largest[quantity] = max(self.largest.get(quantity, 0.0), difference)
        assert difference <= tolerance, f"{quantity}: |msx - reference| = {difference:.3g} > {tolerance:g}"

    def table(self) -> str:
        width = max(map(len, self.largest), default=0)
        return "\n".join(f"{name:{width}s}  {value:.3g}" for name, value in self.largest.items())


@pytest.fixture(scope="module")
def agreement():
    """One module's Agreement; its table of largest differences is printed when the module ends (pytest -s)."""
    recorder = Agreement()
    yield recorder
    if recorder.largest:
        print(f"\nlargest |msx - reference| per quantity:\n{recorder.table()}")
