"""docs/COMPAT.md is the index of the drop-in modules; these tests keep it true.

- every shim a supported or accepted-and-ignored row names exists and is callable (a few data
  attributes, listed here, are only checked to exist);
- every module-level upstream name a not-supported row lists (``deep_gemm.bf16_gemm_nt``,
  ``deep_gemm.testing.get_arch_major``, ...) is absent from the compat module, and asking for it raises
  ``AttributeError`` with the reason;
- every public name of the three compat modules appears in some row.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest

TABLE = Path(__file__).resolve().parents[1] / "docs" / "COMPAT.md"
STATUSES = ("supported", "accepted-and-ignored", "not supported")
MODULES = {"flash_mla": "deepport.compat.flash_mla", "deep_gemm": "deepport.compat.deep_gemm",
           "deep_ep": "deepport.compat.deep_ep"}
DATA_ATTRIBUTES = {"deepport.compat.deep_ep.topk_idx_t"}


def rows() -> list[tuple[list[str], list[str], str]]:
    """``(upstream names, shim paths, status)`` of every table row (names: the backticked tokens)."""
    found = []
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[2] not in STATUSES:
            continue
        found.append((re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]+)`", cells[1]), cells[2]))
    return found


def resolve(path: str) -> Any:
    """The object at a dotted path: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def shims(*statuses: str) -> list[str]:
    return sorted({path for _, paths, status in rows() if status in statuses for path in paths})


def test_the_table_has_rows_of_every_status() -> None:
    statuses = {status for _, _, status in rows()}
    assert statuses == set(STATUSES) and len(rows()) > 60


@pytest.mark.parametrize("path", shims("supported", "accepted-and-ignored"))
def test_every_listed_shim_exists_and_is_callable(path: str) -> None:
    assert path.startswith("deepport.compat."), path
    obj = resolve(path)
    assert path in DATA_ATTRIBUTES or callable(obj), f"{path} is not callable"


def absent_names() -> list[tuple[str, str]]:
    """``(compat module, name)`` of every ``package[.module].name`` a not-supported row lists."""
    names = set()
    for upstream, _, status in rows():
        for name in upstream:
            match = re.fullmatch(r"(flash_mla|deep_gemm|deep_ep)((?:\.[a-z_]\w*)*)\.([A-Za-z_]\w*)", name)
            if status == "not supported" and match:
                names.add((MODULES[match.group(1)] + match.group(2), match.group(3)))
    return sorted(names)


@pytest.mark.parametrize(("module", "name"), absent_names())
def test_every_module_level_name_marked_not_supported_is_absent_with_its_reason(module: str, name: str) -> None:
    compat = importlib.import_module(module)
    assert not hasattr(compat, name)
    with pytest.raises(AttributeError, match="not provided by deepport"):
        getattr(compat, name)


@pytest.mark.parametrize("module", sorted(MODULES.values()))
def test_every_public_name_is_in_the_table(module: str) -> None:
    listed = set(shims(*STATUSES))
    compat = importlib.import_module(module)
    public = [n for n in compat.__all__ if not isinstance(getattr(compat, n), type(compat))]  # modules aside
    missing = [n for n in public if f"{module}.{n}" not in listed]
    assert not missing, f"{module}: not in docs/COMPAT.md: {missing}"
