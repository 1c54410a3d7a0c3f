"""Automatic selection end to end on real inputs: every single-device bench config of this device called with no
backend named, through the op layer (``deepport.<op>(..., backend=None)``), once.

For each call it prints the backend chosen and why, and checks that the shape bucket the op layer's
``call.perf_shape`` falls in is the one ``deepport tune-table`` filed that config's bench result under, and
that the backend chosen is the first of that bucket's measured ranking (every backend of the shipped table
runs every bench config it was measured on). Ops the table has no figures for (MoE on one GPU), and every
config where the device's family has no table (a CPU: its tiny configs), only print the choice. Writes
``$OUT/selection.json``; exit 1 on a mismatch.

    python3 scripts/gpu_selection.py            # on the GPU machine, from the repository root
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import deepport  # noqa: F401  (wires the built-in backends)
from deepport.bench import configs
from deepport.conformance.runner import default_device
from deepport.dispatch import device_info, perf_table, selection
from deepport.kernels import descriptor


def main() -> int:
    device = default_device()
    info = device_info(device)
    table = perf_table.table_for(info)
    print(f"{info.describe()}: family {perf_table.family(info)}, table {table.origin if table else 'none'}")
    seen: list[tuple[str, Any, selection.Automatic]] = []
    original = selection.automatic

    def recording(op: str, signature: Any, shape: Any = None) -> selection.Automatic:
        found = original(op, signature, shape)
        seen.append((op, dict(shape or {}), found))
        return found

    selection.automatic = recording  # type: ignore[assignment]  # choose() looks it up at each call
    rows, failures = [], 0
    for config in configs.select(device.type):
        if config.world_size > 1:
            continue
        start = time.perf_counter()
        seen.clear()
        workload = config.build(device, 0)
        workload.call(None)()  # type: ignore[arg-type]  # None: no backend named, the automatic choice
        if device.type == "cuda":
            torch.cuda.synchronize()
        del workload
        if not seen:
            print(f"  {config.id}: no automatic choice recorded")
            failures += 1
            continue
        op, shape, auto = seen[-1]
        row: dict[str, Any] = {"config": config.id, "shape": shape, "chosen": auto.backend.name, "reason": auto.reason}
        if table is not None and op in table.buckets:  # an op the table measured
            fn = descriptor(op).load_perf_shape()
            labels = table.bucket(op, fn(config.params) if fn else {})
            expected = table.lookup(op, labels, info.name) if labels else None
            row["bench_bucket"] = labels[0] if labels else None
            row["expected"] = expected.backends[0] if expected else None
            row["ok"] = (labels == table.bucket(op, shape) and expected is not None
                         and auto.measured is not None and auto.measured.bucket == labels[0]
                         and auto.backend.name == expected.backends[0])
            failures += not row["ok"]
        rows.append(row)
        mark = {True: "ok  ", False: "FAIL", None: "    "}[row.get("ok")]
        print(f"  {mark} {config.id:<48} -> {auto.backend.name:<7} {time.perf_counter() - start:5.1f} s  "
              f"{auto.reason}")
    out = Path(os.environ.get("OUT", "/tmp/deepport-out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection.json").write_text(json.dumps({"device": info.describe(), "rows": rows}, indent=1) + "\n")
    print(f"{len(rows)} configs, {failures} mismatches; wrote {out / 'selection.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
