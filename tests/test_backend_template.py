"""The backend template (deepport/backends/_template/): copied to a new package, one op filled with the
oracle, registered as a plug-in, it certifies that op at the smoke tier; its other ops are not_supported."""

from __future__ import annotations

import importlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import deepport.backends._template as template
from deepport.backends import BUILTIN
from deepport.conformance import Status, run_suite, select_cases
from deepport.dispatch import registered

pytestmark = pytest.mark.usefixtures("clean_env")
TEMPLATE = Path(template.__file__).parent


@pytest.fixture
def vendor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The template copied to the package ``vendor_port`` (step 1 of its walk-through), mla_decode filled."""
    package = tmp_path / "vendor_port"
    shutil.copytree(TEMPLATE, package, ignore=shutil.ignore_patterns("__pycache__"))
    for source in package.glob("*.py"):
        text = source.read_text().replace("deepport.backends._template", "vendor_port")
        source.write_text(text.replace('name="template"', 'name="vendor_port"'))
    with (package / "mla_decode.py").open("a") as f:  # step 3: fill one op (here with the oracle itself)
        f.write("\n\nfrom deepport.kernels.f64.mla_decode import run  # noqa: E402, F811\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("vendor_port")
    for name in [m for m in sys.modules if m == "vendor_port" or m.startswith("vendor_port.")]:
        del sys.modules[name]


def test_the_template_is_not_registered() -> None:
    assert all("_template" not in name for name in BUILTIN)
    assert template.BACKEND.name == "template" and not template.BACKEND.priority


def test_every_stub_says_what_to_implement() -> None:
    """Each stub raises NotImplementedError naming its op's family and the oracle to compare against."""
    for record in (*template.MLA_DECODE, *template.FP8_GEMM, *template.FP8_GROUPED_GEMM, *template.MOE):
        module, _, attr = record.entry.partition(":")
        assert module.startswith("deepport.backends._template.")
        stub = getattr(importlib.import_module(module), attr)
        args = (None,) if record.op.startswith("moe_") else (None,) * (3 if record.op == "mla_decode" else 2)
        family = record.op.removeprefix("m_grouped_").split("_")[0]  # mla, fp8, moe
        with pytest.raises(NotImplementedError, match=rf"(?s){family}.*deepport\.kernels\.f64"):
            stub(*args)


def test_a_filled_template_certifies_its_op(vendor: ModuleType) -> None:
    with registered(vendor.BACKEND):  # step 5, as `deepport certify --plugin vendor_port:BACKEND` does
        run = run_suite(["vendor_port"], "smoke", device="cpu", run_seed=11, ops=["mla_decode", "fp8_gemm_nt"])
    by_op: dict[str, set[Status]] = {}
    for r in run.cases:
        by_op.setdefault(r.op, set()).add(r.status)
    failed = [(r.case_id, r.status, r.message) for r in run.cases if r.op == "mla_decode" and r.status != Status.PASS]
    assert not failed, failed
    assert len([r for r in run.cases if r.op == "mla_decode"]) == len(select_cases("smoke", ["mla_decode"]))
    assert by_op["fp8_gemm_nt"] == {Status.NOT_SUPPORTED}
    assert all("does not implement fp8_gemm_nt" in r.message for r in run.cases if r.op == "fp8_gemm_nt")
