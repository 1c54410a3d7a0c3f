"""A conformance case: parameters plus a seed, never stored tensors.

Inputs are regenerated from ``(params, seed)`` by the op's versioned generator, so a case costs a
line of data and any failure is reproducible from its id and the run seed printed with it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

TIERS = ("smoke", "full")


@dataclass(frozen=True)
class Case:
    """One case. ``tier`` is the smallest tier that runs it (``full`` runs ``smoke`` cases too).

    ``profile`` is ``"core"`` (the shapes the upstream library supports; a port must pass all of
    them) or ``"extension"`` (beyond upstream; a backend may declare them unsupported).
    """

    id: str
    op: str
    tier: str
    profile: str
    features: tuple[str, ...]
    params: Mapping[str, Any]

    @property
    def base_seed(self) -> int:
        return zlib.crc32(self.id.encode())

    def seed(self, run_seed: int) -> int:
        """The case's seed in a run: fresh per run seed, identical for every backend in that run."""
        return int(np.random.SeedSequence([run_seed, self.base_seed]).generate_state(1, np.uint64)[0] >> 1)

    def in_tier(self, tier: str) -> bool:
        return TIERS.index(self.tier) <= TIERS.index(tier)


def make_case(op: str, name: str, tier: str, profile: str, features: tuple[str, ...],
              params: Mapping[str, Any]) -> Case:
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}")
    return Case(f"{op}/{name}", op, tier, profile, features, MappingProxyType(dict(params)))
