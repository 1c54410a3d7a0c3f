"""The fixed exchange's slots of a peer memory: their size, laid out once, and the largest split they take.

A peer memory (:mod:`.peer_memory_cuda`, :mod:`.peer_memory_shm`) lays out its two areas of ``world`` slots
when it is created, ``slot_bytes`` each; the kernel and the CPU twin locate every slot from that size.
``fixed_capacity`` is the largest equal split per rank that the transport sends through those slots: a
caller may lower it (``0`` sends everything in rounds) or raise it back, but never above ``slot_bytes``,
so no exchange can write past the slots.
"""

from __future__ import annotations


class FixedSlots:
    slot_bytes: int = 0
    _limit: int = 0

    def _lay_out_slots(self, fixed_capacity: int) -> None:
        if fixed_capacity < 0 or fixed_capacity % 16:
            raise ValueError(f"fixed_capacity must be a non-negative multiple of 16 bytes, got {fixed_capacity}")
        self.slot_bytes = self._limit = int(fixed_capacity)

    @property
    def fixed_capacity(self) -> int:
        """Largest equal split per rank (bytes) taken by the fixed exchange; 0: none."""
        return self._limit

    @fixed_capacity.setter
    def fixed_capacity(self, value: int) -> None:
        if not 0 <= int(value) <= self.slot_bytes:
            raise ValueError(f"fixed_capacity must be within 0 .. {self.slot_bytes} bytes (the slots laid out "
                             f"when this memory was created), got {value}")
        self._limit = int(value)
