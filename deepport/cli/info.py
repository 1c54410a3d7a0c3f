"""``deepport info``: the hardware, the torch build, every backend and what automatic selection picks.

:func:`collect` gathers everything as JSON-ready data (``deepport info --json`` prints it as is);
:func:`render` prints the same to a rich console.
"""

from __future__ import annotations

import importlib
import platform
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

import deepport
from deepport.dispatch import registry, selection, visible_devices
from deepport.dispatch.device import DeviceInfo
from deepport.errors import DeepportError
from deepport.kernels import OPS


def _torch_build() -> dict[str, Any]:
    hip = getattr(torch.version, "hip", None)
    if hip:
        build = f"ROCm/HIP {hip}"
    elif torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
    else:
        build = "CPU-only build (no CUDA or HIP)"
    return {"version": torch.__version__, "build": build, "cuda": torch.version.cuda, "hip": hip,
            "cuda_available": torch.cuda.is_available()}


def _device(info: DeviceInfo) -> dict[str, Any]:
    return {"device": info.type if info.index is None else f"{info.type}:{info.index}", "type": info.type,
            "index": info.index, "kind": info.kind, "vendor": info.vendor, "name": info.name, "arch": info.arch,
            "units": info.multiprocessors, "describe": info.describe()}


def _selection(op: str, info: DeviceInfo) -> dict[str, Any]:
    signature = OPS[op].example_signature(info)
    found = selection.verdicts(op, signature)
    reason = ""
    try:
        chosen, source = selection.choose(op, signature)
        name: str | None = chosen.name
        if source == "automatic":
            reason = selection.automatic(op, signature).reason
    except DeepportError as exc:
        name, source = None, f"{type(exc).__name__}: {exc}"
    return {"op": op, "device": _device(info)["device"], "call": str(signature), "chosen": name, "source": source,
            "reason": reason,
            "verdicts": [{"backend": v.backend, "priority": v.priority, "can_run": v.can_run,
                          "reasons": list(v.reasons)} for v in found]}


def _toolchains() -> dict[str, Any]:
    """Per available built-in backend, what its package's optional ``toolchain_info()`` reports (the
    OpenCL backend: every OpenCL device with its versions and extensions)."""
    from deepport.backends import BUILTIN

    found: dict[str, Any] = {}
    for name in BUILTIN:
        module = importlib.import_module(name)
        hook, backend = getattr(module, "toolchain_info", None), getattr(module, "BACKEND", None)
        if hook is None or backend is None or backend.unavailable_reason is not None:
            continue
        try:
            found[backend.name] = hook()
        except Exception as exc:  # a broken driver must not break `deepport info`
            found[backend.name] = {"error": f"{type(exc).__name__}: {exc}"}
    return found


def collect() -> dict[str, Any]:
    """Everything ``deepport info`` shows, as JSON-ready data."""
    devices = visible_devices()
    kinds = list(dict.fromkeys(d.kind for d in devices))
    toolchains = _toolchains()
    backends = [{
        "name": b.name, "version": b.version, "summary": b.summary, "available": b.unavailable_reason is None,
        "unavailable_reason": b.unavailable_reason, "priority": dict(b.priority),
        "auto_priority": {kind: b.auto_priority(kind) for kind in kinds},
        "ops": {s.op: list(s.describe()) for s in b.ops},
        "toolchain": toolchains.get(b.name),
    } for b in registry.all_backends()]
    return {
        "deepport": deepport.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _torch_build(),
        "devices": [_device(d) for d in devices],
        "backends": backends,
        "selection": [_selection(op, d) for d in devices for op in OPS],
    }


def _render_toolchain(toolchain: dict[str, Any] | None, console: Console) -> None:
    """A backend's toolchain details: lists of records one per line (long lists last), scalars as is."""
    for key, value in (toolchain or {}).items():
        if not isinstance(value, list):
            console.print(Text(f"    {key}: {value}"), soft_wrap=True)
            continue
        console.print(Text(f"    {key}:"))
        for item in value:
            if not isinstance(item, dict):
                console.print(Text(f"      {item}"), soft_wrap=True)
                continue
            scalars = [f"{k}={v}" for k, v in item.items() if not isinstance(v, list)]
            console.print(Text("      " + ", ".join(scalars)), soft_wrap=True)
            for k, v in item.items():
                if isinstance(v, list):
                    console.print(Text(f"        {k}: {' '.join(str(x) for x in v)}"), soft_wrap=True)


def render(data: dict[str, Any], console: Console) -> None:
    """Print :func:`collect`'s data: devices, backends with their ops and priorities, automatic choices."""
    t = data["torch"]
    console.print(Text(f"deepport {data['deepport']}", style="bold"))
    console.print(Text(f"  python {data['python']} on {data['platform']}"), soft_wrap=True)
    console.print(Text(f"  torch {t['version']}: {t['build']}"))
    console.print()
    devices = Table(title="Devices", title_justify="left", box=None, pad_edge=False)
    for column in ("device", "kind", "vendor", "name", "arch", "units"):
        devices.add_column(column)
    for d in data["devices"]:
        devices.add_row(d["device"], d["kind"], d["vendor"], d["name"], d["arch"], str(d["units"]))
    console.print(devices)
    console.print()
    console.print(Text("Backends", style="bold"))
    for b in data["backends"]:
        state = Text("available", style="green") if b["available"] else Text(
            f"unavailable: {b['unavailable_reason']}", style="yellow")
        console.print(Text.assemble("  ", (b["name"], "bold"), f" v{b['version']}  ", state))
        console.print(Text(f"    {b['summary']}"))
        declared = ", ".join(f"{k}: {v}" for k, v in b["priority"].items()) or "none (explicit use only)"
        effective = ", ".join(f"{k} -> {'never' if v is None else v}" for k, v in b["auto_priority"].items())
        console.print(Text(f"    automatic priority: {declared}  (here: {effective})"))
        for op, lines in b["ops"].items():
            console.print(Text(f"    {op}: {'; '.join(lines)}"))
        _render_toolchain(b.get("toolchain"), console)
    console.print()
    console.print(Text("Automatic selection for each op's core example call", style="bold"))
    for s in data["selection"]:
        chosen = Text(s["chosen"], style="bold green") if s["chosen"] else Text("none", style="bold red")
        console.print(Text.assemble("  ", s["op"], " on ", s["device"], " -> ", chosen, f"  ({s['source']})"))
        console.print(Text(f"    call: {s['call']}"))
        if s.get("reason"):
            console.print(Text(f"    why: {s['reason']}"), soft_wrap=True)
        for v in s["verdicts"]:
            mark = "->" if v["backend"] == s["chosen"] else "  "
            prio = "never" if v["priority"] is None else str(v["priority"])
            answer = "can run" if v["can_run"] else "cannot run: " + "; ".join(v["reasons"])
            console.print(Text(f"    {mark} {v['backend']:<12} priority {prio:>5}  {answer}"))
