"""FastLaunch: Triton's path for every new configuration, the compiled kernel's runner after it, and a new
configuration whenever anything Triton specialises on changes (a stand-in kernel records the calls)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from deepport.backends.triton.fast_launch import FastLaunch


class _Compiled:
    def __init__(self, log: list[Any], key: Any) -> None:
        self.log, self.key = log, key

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def runner(*args: Any) -> None:
            self.log.append(("runner", self.key, grid, args))
        return runner


class _Kernel:
    """What FastLaunch reads of a ``@triton.jit`` function: ``arg_names``, ``constexprs``, ``kernel[grid](...)``."""

    def __init__(self) -> None:
        self.arg_names = ["x_ptr", "n", "m", "BLOCK"]
        self.constexprs = [3]
        self.log: list[Any] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def launch(*args: Any, num_warps: int) -> _Compiled:
            self.log.append(("triton", grid, args, num_warps))
            return _Compiled(self.log, len(self.log))
        return launch


@pytest.fixture(autouse=True)
def _compiled_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter would take Triton's path at every call


def test_the_second_call_of_a_configuration_takes_the_compiled_kernels_runner() -> None:
    kernel = _Kernel()
    fast = FastLaunch(kernel)
    x = torch.zeros(64)
    fast((4,), x, 32, 7, 128, num_warps=2)
    fast((5, 2), x, 48, 9, 128, num_warps=2)  # same specialisation: ints of the same kind, same constexpr
    assert [e[0] for e in kernel.log] == ["triton", "runner"]
    assert kernel.log[1][2] == (5, 2, 1) and kernel.log[1][3] == (x, 48, 9, 128)


@pytest.mark.parametrize("change", ["constexpr", "one", "divisible", "wide", "dtype", "misaligned", "warps"])
def test_anything_triton_specialises_on_makes_a_new_configuration(change: str) -> None:
    kernel = _Kernel()
    fast = FastLaunch(kernel)
    x = torch.zeros(64)
    args: list[Any] = [x, 32, 7, 128]
    fast((1,), *args, num_warps=2)
    warps = 2
    if change == "constexpr":
        args[3] = 256
    elif change == "one":
        args[2] = 1
    elif change == "divisible":
        args[1] = 33
    elif change == "wide":
        args[1] = 1 << 40
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float64)
    elif change == "misaligned":
        args[0] = x[1:]
    else:
        warps = 4
    fast((1,), *args, num_warps=warps)
    assert [e[0] for e in kernel.log] == ["triton", "triton"], change


def test_every_parameter_is_required() -> None:
    with pytest.raises(TypeError, match="all 4 parameters"):
        FastLaunch(_Kernel())((1,), torch.zeros(4), 1, 2)
