"""Identity of what a certificate covers: the suite's source, the software, the device, the backends.

- :func:`suite_source_sha256`: a digest of the suite's source, the op contracts and float64 oracles
  (``deepport/kernels``) and the judging harness (``deepport/conformance``, without the exploit corpus
  and the tools that only read results: reports, verifier, waivers, pytest plugin). A certificate
  verifies only against the same source: any change to a generator, tolerance, check or oracle
  changes the digest.
- :func:`software_versions`: installed distributions (read from their metadata, nothing imported) and
  the toolkits torch was built with.
- :func:`device_identity`: the device as torch reports it (name, capability, memory, UUID) and, where the
  OS exposes it, the driver version.
- :func:`declared_capabilities`: a backend's declaration as data (ops, dtypes, device kinds,
  requirements, priorities, explicit profiles) and its own ``identity()`` report.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from deepport.dispatch import Backend

_PACKAGE = Path(__file__).resolve().parents[1]  # deepport/
SUITE_SOURCES = ("kernels", "conformance")
# Modules of deepport/conformance that only read or present results: not part of what is judged.
_TOOLING = frozenset({"report.py", "html_report.py", "verify.py", "certificate.py", "certificate_verify.py",
                      "replay.py", "waivers.py", "pytest_plugin.py", "identity.py"})
_DISTRIBUTIONS = ("deepport", "torch", "numpy", "triton", "pyopencl", "pocl-binary-distribution", "cupy-cuda13x",
                  "cuda-bindings", "nvidia-cuda-nvrtc", "rich")


def suite_source_files() -> list[Path]:
    """The files :func:`suite_source_sha256` covers, sorted by path."""
    files = []
    for top in SUITE_SOURCES:
        for path in sorted((_PACKAGE / top).rglob("*.py")):
            rel = path.relative_to(_PACKAGE)
            if rel.parts[:2] == ("conformance", "exploits") or (rel.parts[0] == "conformance" and len(rel.parts) == 2
                                                                 and rel.name in _TOOLING):
                continue
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(_PACKAGE).as_posix())


def suite_source_sha256() -> tuple[str, int]:
    """``(hex digest, number of files)`` over each file's package-relative path, size and bytes."""
    digest = hashlib.sha256()
    files = suite_source_files()
    for path in files:
        data = path.read_bytes()
        digest.update(f"{path.relative_to(_PACKAGE).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest(), len(files)


def software_versions() -> dict[str, str | None]:
    """Python, the installed distributions that matter to a run (None: not installed), and torch's toolkits."""
    found: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["torch_cuda"] = torch.version.cuda
    found["torch_hip"] = getattr(torch.version, "hip", None)
    cudnn = getattr(torch.backends, "cudnn", None)
    try:
        version = cudnn.version() if cudnn is not None and cudnn.is_available() else None
    except Exception:  # a broken cuDNN install is not this record's concern
        version = None
    found["cudnn"] = None if version is None else str(version)
    return found


def _driver_version() -> str | None:
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def _cpu_model() -> str | None:
    """The CPU's model name as the OS reports it (Linux ``/proc/cpuinfo``), else ``None``."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return None


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def device_identity(device: torch.device) -> dict[str, Any]:
    """The device as torch reports it, plus the kernel driver's version line where the OS exposes one; a CPU
    as the OS reports it (model name, logical cores, memory, torch's intra-op threads)."""
    info: dict[str, Any] = {"device": str(device), "type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", total_memory=props.total_memory,
                    multiprocessors=props.multi_processor_count, uuid=str(getattr(props, "uuid", "")) or None,
                    gcn_arch=getattr(props, "gcnArchName", None), driver=_driver_version())
    elif device.type == "cpu":
        info.update(name=_cpu_model() or platform.processor() or platform.machine(), machine=platform.machine(),
                    logical_cores=os.cpu_count(), total_memory=_memory_bytes(), torch_threads=torch.get_num_threads())
    else:
        info.update(name=platform.processor() or platform.machine(), machine=platform.machine())
    return info


def declared_capabilities(backend: Backend) -> dict[str, Any]:
    """The backend's declaration as data, and what its ``identity()`` reports (or why it failed)."""
    ops = [{"op": s.op, "entry": s.entry, "dtypes": sorted(str(d).removeprefix("torch.") for d in s.dtypes),
            "device_kinds": None if s.device_kinds is None else sorted(s.device_kinds),
            "requirements": [r.description for r in s.requirements]} for s in backend.ops]
    identity: dict[str, str] = {}
    if backend.identity is not None:
        try:
            identity = {str(k): str(v) for k, v in backend.identity().items()}
        except Exception as exc:  # recorded, not fatal: the identity is information, not a check
            identity = {"error": f"{type(exc).__name__}: {exc}"}
    return {"name": backend.name, "version": backend.version, "summary": backend.summary, "oracle": backend.oracle,
            "available": backend.unavailable_reason is None, "unavailable_reason": backend.unavailable_reason,
            "priority": dict(backend.priority),
            "profiles": None if backend.profiles is None else list(backend.profiles), "ops": ops,
            "identity": identity}
