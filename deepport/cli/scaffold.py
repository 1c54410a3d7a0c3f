"""``deepport new-backend NAME [--out DIR]``: start an out-of-tree backend from the template.

Writes ``DIR/NAME/`` (a copy of ``deepport/backends/_template/`` whose module paths and backend name are
``NAME``; every op a stub that says what to write) and ``DIR/pyproject.toml`` (a distribution named
``NAME`` whose ``deepport.backends`` entry point registers it: after ``pip install -e DIR``, every
deepport process, its isolation workers and rank processes included, finds the backend by name).
``DIR`` defaults to ``NAME``; nothing existing is overwritten. The walk-through is ``docs/PORTING.md``.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

import deepport.backends._template as template

TEMPLATE_MODULE = "deepport.backends._template"
_PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.1.0"
description = "A deepport backend"
requires-python = ">=3.11"
dependencies = ["deepport"]

# Registers the backend: every deepport process imports `{name}` and reads its BACKEND.
[project.entry-points."deepport.backends"]
{name} = "{name}"

[tool.setuptools.packages.find]
include = ["{name}*"]
'''


class ScaffoldError(ValueError):
    """A name or folder ``new-backend`` cannot use."""


_COPY_STEP = re.compile(r"^1\. Copy ``deepport/backends/_template/``.*?(?=^2\. )", re.S | re.M)


def _renamed_walkthrough(text: str, name: str) -> str:
    """The template's ``__init__`` docstring told for the renamed copy: its first line and step 1 (copy and
    rename) describe what ``new-backend`` already did, instead of asking to replace the package's own name."""
    first = '"""A backend template: copy this folder, fill one op at a time, certify it. Not registered (not in ' \
        'BUILTIN).'
    if not text.startswith(first) or not _COPY_STEP.search(text):
        raise ScaffoldError("deepport/backends/_template/__init__.py no longer starts as new-backend expects "
                            "(its first line and walk-through step 1): update deepport/cli/scaffold.py")
    text = f'"""The {name} backend, started from deepport\'s template: fill one op at a time, certify it.' + \
        text[len(first):]
    step1 = (f"1. Done by ``deepport new-backend``: this package is deepport's template "
             f"(``deepport/backends/_template/``)\n   renamed to ``{name}``, and ``pyproject.toml`` next to it "
             f"registers it in the entry-point group\n   ``deepport.backends``.\n")
    return _COPY_STEP.sub(lambda _: step1, text, count=1)


def new_backend(name: str, out: Path | None = None) -> list[Path]:
    """Create the package and ``pyproject.toml`` (see the module docstring); returns the files written."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name) or keyword.iskeyword(name) or name.startswith("deepport"):
        raise ScaffoldError(f"backend name {name!r}: expected a lowercase Python identifier not starting with "
                            "'deepport' (it is the package's import name and the backend's name)")
    root = Path(out) if out is not None else Path(name)
    package = root / name
    targets = [package, root / "pyproject.toml"]
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise ScaffoldError(f"{', '.join(existing)} already exist(s); choose another --out or name")
    package.mkdir(parents=True)
    written = []
    for source in sorted(Path(template.__file__).parent.glob("*.py")):
        text = source.read_text(encoding="utf-8")
        if source.name == "__init__.py":
            text = _renamed_walkthrough(text, name)
        text = text.replace(TEMPLATE_MODULE, name)
        text = text.replace('name="template"', f'name="{name}"')
        text = text.replace('summary="a backend template (copy deepport/backends/_template/)"',
                            f'summary="{name}: a deepport backend (from the template)"')
        (package / source.name).write_text(text, encoding="utf-8")
        written.append(package / source.name)
    (root / "pyproject.toml").write_text(_PYPROJECT.format(name=name), encoding="utf-8")
    return [*written, root / "pyproject.toml"]
