"""deepport.backends.triton.aot: recorded launches run the launcher's host code but no kernel, and the
occupancy a compiled kernel allows follows from its shared memory and registers."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("triton")

from deepport.backends.triton import aot


def _lowering(shared_kib: int, registers: int, threads: int) -> aot.Lowering:
    return aot.Lowering("k", 1, ("bf16.bf16",), 0, 0, shared_kib * 1024, registers, 0, threads)


@pytest.mark.parametrize(("shared_kib", "registers", "threads", "programs"), [
    (216, 255, 256, 1),  # shared memory and registers each allow one
    (109, 255, 128, 2),  # two by both
    (55, 255, 128, 2),  # four by shared memory, two by registers
    (72, 154, 128, 3),  # three by both
    (96, 87, 256, 2),  # two by shared memory
])
def test_programs_per_sm_is_the_tighter_of_shared_memory_and_registers(shared_kib: int, registers: int,
                                                                       threads: int, programs: int) -> None:
    assert _lowering(shared_kib, registers, threads).programs_per_sm() == programs


class _Kernel:
    """Stands in for a JIT function: ``kernel[grid](...)`` calls ``self.run(..., grid=, warmup=)``."""

    def __init__(self) -> None:
        self.ran = 0
        self.fn = self.run

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        self.ran += 1

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)


def test_recorded_launches_are_kept_and_not_run_then_the_kernel_runs_again() -> None:
    kernel = _Kernel()
    with aot.recorded_launches([kernel]) as launches:
        kernel[(3, 1)](1, 2, FLAG=True, num_warps=4)
    assert kernel.ran == 0
    assert [(x.grid, x.args, x.kwargs) for x in launches] == [((3, 1), (1, 2), {"FLAG": True, "num_warps": 4})]
    kernel[(1,)]()
    assert kernel.ran == 1
