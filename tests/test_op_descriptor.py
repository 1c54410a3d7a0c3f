"""One descriptor per op: a toy op declared by one descriptor reaches OPS, dispatch, the suite registry and
the tolerance table, runs through a backend and is certified; the built-in descriptors resolve."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import numpy as np
import pytest
import torch

import deepport
from deepport.conformance import Status, run_suite, select_cases
from deepport.conformance.case import Case, make_case
from deepport.conformance.suites import SUITES
from deepport.conformance.tolerance import TOLERANCES, Tolerance
from deepport.dispatch import Backend, DeviceInfo, OpSupport, device_info, known_ops, registered, selection
from deepport.errors import InvalidArgumentError
from deepport.kernels import DESCRIPTORS, OPS, OpDescriptor, op_added

pytestmark = pytest.mark.usefixtures("clean_env")

# --- the toy op: out = 2 * x, float32 [n] -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToySignature:
    device: DeviceInfo
    dtype: torch.dtype
    n: int


@dataclasses.dataclass(frozen=True)
class ToyCall:
    x: torch.Tensor
    signature: ToySignature


class ToySpec:
    """The contract: ``toy_scale(x, out)`` writes ``2 * x`` into ``out`` (float32 ``[n]``, same device)."""

    OP = "toy_scale"
    OP_VERSION = 1

    @staticmethod
    def bind(x: torch.Tensor, out: torch.Tensor) -> ToyCall:
        if x.dtype != torch.float32 or x.dim() != 1:
            raise InvalidArgumentError("x", f"expected float32 [n], got {x.dtype} {tuple(x.shape)}")
        if out.shape != x.shape or out.dtype != x.dtype:
            raise InvalidArgumentError("out", f"expected {x.dtype} {tuple(x.shape)}, got {out.dtype} "
                                              f"{tuple(out.shape)}")
        return ToyCall(x, ToySignature(device_info(x.device), x.dtype, int(x.shape[0])))

    @staticmethod
    def example_signature(device: DeviceInfo) -> ToySignature:
        return ToySignature(device, torch.float32, 8)


def toy_scale(x: torch.Tensor, out: torch.Tensor, *, backend: str | None = None) -> None:
    call = ToySpec.bind(x, out)
    chosen, _ = selection.choose(ToySpec.OP, call.signature, backend)
    chosen.implementation(ToySpec.OP)(call, out)


def toy_scale_f64(x: np.ndarray) -> np.ndarray:
    """The oracle."""
    return 2.0 * x.astype(np.float64)


def run_with_oracle(call: ToyCall, out: torch.Tensor) -> None:
    """A backend's implementation: the oracle, rounded once."""
    out.copy_(torch.from_numpy(toy_scale_f64(call.x.cpu().numpy())).to(out.dtype))


@dataclasses.dataclass(frozen=True)
class ToyInputs:
    tensors: dict[str, torch.Tensor]


class ToySuite:
    OP = "toy_scale"
    GENERATOR_VERSION = 1

    @staticmethod
    def cases() -> list[Case]:
        return [make_case("toy_scale", "n37", "smoke", "core", ("basic",), {"n": 37})]

    @staticmethod
    def generate(case: Case, seed: int) -> ToyInputs:
        g = torch.Generator().manual_seed(seed)
        return ToyInputs({"x": torch.randn(int(case.params["n"]), generator=g)})

    @staticmethod
    def output_specs(inputs: ToyInputs) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"out": (tuple(inputs.tensors["x"].shape), torch.float32)}

    @staticmethod
    def dtype_name(inputs: ToyInputs) -> str:
        return "float32"

    @staticmethod
    def invoke(inputs: ToyInputs, tensors: dict[str, torch.Tensor], backend: str,
               outputs: dict[str, torch.Tensor]) -> None:
        toy_scale(tensors["x"], outputs["out"], backend=backend)

    @staticmethod
    def reference(inputs: ToyInputs) -> dict[str, np.ndarray]:
        return {"out": toy_scale_f64(inputs.tensors["x"].numpy())}


SUITE = ToySuite()
TOY_TOLERANCES = {("toy_scale", "out", "float32"): Tolerance(2.0**-23, 0.0, 0.0, 1e-12)}

TOY = OpDescriptor(ToySpec, oracle=f"{__name__}:toy_scale_f64", suite=f"{__name__}:SUITE",
                   tolerances=f"{__name__}:TOY_TOLERANCES")
TOY_BACKEND = Backend(name="toy", summary="test backend of the toy op", version="0", priority={"cpu": 1},
                      ops=(OpSupport(op="toy_scale", entry=f"{__name__}:run_with_oracle",
                                     dtypes=frozenset({torch.float32})),))


def test_one_descriptor_adds_an_op_everywhere() -> None:
    assert "toy_scale" not in OPS and "toy_scale" not in known_ops() and "toy_scale" not in SUITES
    with op_added(TOY):
        assert OPS["toy_scale"] is ToySpec
        assert "toy_scale" in known_ops()  # dispatch learnt the name: use_backend accepts it
        with deepport.use_backend(toy_scale="toy"):
            pass
        assert SUITES["toy_scale"] is SUITE
        assert TOLERANCES[("toy_scale", "out", "float32")].rtol == 2.0**-23
        assert [c.id for c in select_cases("smoke", ["toy_scale"])] == ["toy_scale/n37"]
        with registered(TOY_BACKEND):
            x, out = torch.randn(5), torch.full((5,), float("nan"))
            assert deepport.explain("toy_scale", x, out).chosen == "toy"
            toy_scale(x, out)
            assert torch.equal(out, 2 * x)
            run = run_suite(["toy", "reference"], "smoke", device="cpu", run_seed=5, ops=["toy_scale"])
        statuses = {r.backend: r.status for r in run.cases}
        assert statuses == {"toy": Status.PASS, "reference": Status.NOT_SUPPORTED}, run.cases
    assert "toy_scale" not in OPS and "toy_scale" not in known_ops() and "toy_scale" not in SUITES
    assert ("toy_scale", "out", "float32") not in TOLERANCES
    with pytest.raises(InvalidArgumentError), deepport.use_backend(toy_scale="toy"):
        pass


def test_an_op_name_is_declared_once() -> None:
    with pytest.raises(ValueError, match="already declared"), op_added(DESCRIPTORS[0]):
        pass
    assert "mla_decode" in OPS  # the failed declaration removed nothing


# --- the built-in descriptors --------------------------------------------------------------------------


@pytest.mark.parametrize("d", DESCRIPTORS, ids=lambda d: d.name)
def test_builtin_descriptor_resolves(d: OpDescriptor) -> None:
    assert OPS[d.name] is d.spec and d.version == d.spec.OP_VERSION
    assert callable(d.load_oracle()) and d.oracle.startswith("deepport.kernels.f64.")
    assert d.name == d.load_suite().OP and SUITES[d.name] is d.load_suite()
    assert d.load_tolerances(), f"no tolerance entries for {d.name} in {d.tolerances}"
    assert d.bench is not None and importlib.import_module(d.bench).CONFIGS
    assert getattr(deepport, d.name) is not None and d.name in deepport.__all__  # the public op
    for backend in ("reference", "torch"):  # every built-in implements every op
        assert callable(deepport.dispatch.get(backend).implementation(d.name))


def test_the_derived_views_are_read_only() -> None:
    view: Any = SUITES
    with pytest.raises(TypeError):
        view["mla_decode"] = None
