"""docs/PORTING.md followed from scratch, with its own commands and code: start a package from the template
(``deepport new-backend``), fill mla_decode with the oracle line the guide gives, certify it at the smoke
tier with the guide's first command; then the package's other ops are honestly not supported."""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepport.cli.main import main
from deepport.dispatch import registry

pytestmark = pytest.mark.usefixtures("clean_env")
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "PORTING.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), flags=re.S)


def _command(prefix: str) -> list[str]:
    """The guide's first ``deepport`` command line starting with ``prefix`` (comment stripped), as argv."""
    for block in _blocks("bash"):
        for line in block.splitlines():
            if line.startswith(prefix):
                return shlex.split(line.split("  #")[0])[1:]
    raise AssertionError(f"docs/PORTING.md has no command starting with {prefix!r}")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "acme-deepport"))
    yield tmp_path
    if "acme_port" in {b.name for b in registry.all_backends()}:
        registry.unregister("acme_port")
    for name in [m for m in sys.modules if m == "acme_port" or m.startswith("acme_port.")]:
        del sys.modules[name]


def test_the_porting_guide_from_an_empty_folder_to_a_certified_op(workdir: Path) -> None:
    # step 2: the template, renamed, with a pyproject registering the entry point
    assert main(_command("deepport new-backend")) == 0
    package = workdir / "acme-deepport" / "acme_port"
    pyproject = (workdir / "acme-deepport" / "pyproject.toml").read_text()
    assert '[project.entry-points."deepport.backends"]\nacme_port = "acme_port"' in pyproject
    init = (package / "__init__.py").read_text()
    assert 'name="acme_port"' in init
    # the copy's walk-through says what new-backend did, instead of asking to rename the package to itself
    assert "Done by ``deepport new-backend``" in init and "replace ``acme_port``" not in init
    assert "Not registered" not in init and "The acme_port backend" in init
    # step 3: start from a known-good answer, with the exact line the guide gives
    (oracle_line,) = [b.strip() for b in _blocks("python") if "deepport.kernels.f64.mla_decode" in b]
    with (package / "mla_decode.py").open("a") as f:
        f.write(f"\n\n{oracle_line}\n")
    # step 5: the guide's first look
    argv = _command("deepport certify --backend acme_port:BACKEND")
    assert main(argv) == 0
    results = json.loads((workdir / "certify-out" / "results.json").read_text())
    assert results["backends"] == {"acme_port": results["backends"]["acme_port"]}
    statuses = {c["case_id"]: c["status"] for c in results["cases"]}
    assert statuses and set(statuses.values()) == {"pass"} and all(c.startswith("mla_decode/") for c in statuses)
    # the ops the package does not list are not_supported, with the reason dispatch gives
    assert main(["certify", "--backend", "acme_port", "--op", "fp8_gemm_nt", "--case", "m40_n256", "--out",
                 str(workdir / "fp8")]) == 1
    (fp8,) = json.loads((workdir / "fp8" / "results.json").read_text())["cases"]
    assert fp8["status"] == "not_supported" and "does not implement fp8_gemm_nt" in fp8["message"]


def test_every_command_and_name_the_guide_uses_exists() -> None:
    from deepport.cli.main import build_parser

    parser = build_parser()
    for block in _blocks("bash"):
        for line in block.splitlines():
            if line.startswith("deepport ") and "*" not in line:
                argv = shlex.split(line.split("  #")[0].replace("$NONCE_FROM_YOUR_CUSTOMER", "n0nce-123"))[1:]
                parser.parse_args(argv)  # raises SystemExit on an unknown option
    import deepport.kernels as kernels
    from deepport.kernels import fp8_gemm, fp8_grouped_gemm, mla_decode, moe_args

    for name, module in (("MLADecodeImpl", mla_decode), ("FP8GemmImpl", fp8_gemm),
                         ("FP8GroupedGemmImpl", fp8_grouped_gemm), ("MoEImpl", moe_args)):
        assert hasattr(module, name), name
    assert kernels.__name__ == "deepport.kernels"


def test_new_backend_refuses_bad_names_and_existing_folders(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new-backend", "Acme-Port", "--out", str(tmp_path / "x")]) == 2
    assert main(["new-backend", "deepport_acme", "--out", str(tmp_path / "x")]) == 2
    assert main(["new-backend", "acme", "--out", str(tmp_path / "y")]) == 0
    assert main(["new-backend", "acme", "--out", str(tmp_path / "y")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "expected a lowercase Python identifier" in err and "already exist" in err


def test_the_guides_declaration_builds_a_backend_whose_requirements_read_the_signature() -> None:
    """Section 4's ``BACKEND = Backend(...)`` runs as written (with a probe and an identity), and each of its
    requirements reads fields the MLA decode signature has: it answers, with a reason on a CPU."""
    import torch

    from deepport.dispatch import Backend, device_info
    from deepport.kernels.mla_decode import example_signature

    (block,) = [b for b in _blocks("python") if "BACKEND = Backend(" in b]
    namespace: dict[str, object] = {"probe": lambda: None, "identity": dict}
    exec(block, namespace)  # the guide's own code
    backend = namespace["BACKEND"]
    assert isinstance(backend, Backend) and backend.name == "acme_port"
    (support,) = backend.ops
    signature = example_signature(device_info(torch.device("cpu")))
    answers = {r.description: r.check(signature) for r in support.requirements}
    assert answers["page_block_size in {64}"] is None and answers["s_q <= 4"] is None
    assert answers["device arch in {sm_90}"], "a CPU is not sm_90: the requirement must say what it has instead"
