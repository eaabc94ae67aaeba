"""Sub-allocation inside one slab: a best-fit, coalescing free list over byte offsets.

A slab is one large allocation exported once; buffers are `[offset, offset + size)` ranges in
it. Free space is kept as sorted, non-adjacent blocks: a free merges with its neighbours at
once, so the number of blocks stays small and a linear best-fit scan is cheap. Every offset and
size is a multiple of `ALIGNMENT` (256 bytes, what cudaMalloc guarantees), so any dtype view
of a buffer is aligned.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

ALIGNMENT = 256


def align_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """nbytes rounded up to the alignment; zero-byte buffers still take one aligned unit."""
    return max(alignment, -(-nbytes // alignment) * alignment)


@dataclass(frozen=True)
class Usage:
    capacity: int
    used_bytes: int
    free_bytes: int
    largest_free: int
    free_blocks: int

    @property
    def fragmentation(self) -> float:
        """1 - largest free block / free bytes: 0 when the free space is one block."""
        if self.free_bytes == 0:
            return 0.0
        return 1.0 - self.largest_free / self.free_bytes


class FreeList:
    """Lends aligned ranges of `[0, capacity)`; `alloc` answers None when nothing fits."""

    def __init__(self, capacity: int, alignment: int = ALIGNMENT) -> None:
        if capacity <= 0 or capacity % alignment:
            raise ValueError(f"capacity {capacity} is not a positive multiple of {alignment}")
        self.capacity = capacity
        self.alignment = alignment
        self._starts: list[int] = [0]  # sorted starts of free blocks
        self._sizes: dict[int, int] = {0: capacity}  # free block start -> size
        self._used: dict[int, int] = {}  # lent offset -> aligned size
        self._used_bytes = 0

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new buffer of at least nbytes, or None when no free block is big enough."""
        size = align_up(nbytes, self.alignment)
        best: int | None = None
        best_size = 0
        for start in self._starts:
            block = self._sizes[start]
            if block >= size and (best is None or block < best_size):
                best, best_size = start, block
                if block == size:
                    break
        if best is None:
            return None
        del self._sizes[best]
        i = bisect.bisect_left(self._starts, best)
        if best_size == size:
            del self._starts[i]
        else:
            # keep the remainder where the block was: the list stays sorted
            self._starts[i] = best + size
            self._sizes[best + size] = best_size - size
        self._used[best] = size
        self._used_bytes += size
        return best

    def free(self, offset: int) -> int:
        """Returns a buffer by its offset and merges it with free neighbours; returns its size."""
        size = self._used.pop(offset, None)
        if size is None:
            raise ValueError(f"offset {offset} is not an allocated buffer")
        self._used_bytes -= size
        i = bisect.bisect_left(self._starts, offset)
        start, end = offset, offset + size
        # merge with the following block
        if i < len(self._starts) and self._starts[i] == end:
            end += self._sizes.pop(self._starts[i])
            del self._starts[i]
        # merge with the preceding block
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._sizes[prev] == start:
                self._sizes[prev] = end - prev
                return size
        self._starts.insert(i, start)
        self._sizes[start] = end - start
        return size

    def size_of(self, offset: int) -> int:
        """Aligned size of the buffer at offset (KeyError when none)."""
        return self._used[offset]

    def usage(self) -> Usage:
        free = self.capacity - self._used_bytes
        return Usage(
            capacity=self.capacity,
            used_bytes=self._used_bytes,
            free_bytes=free,
            largest_free=max(self._sizes.values(), default=0),
            free_blocks=len(self._starts),
        )

    def lent(self) -> dict[int, int]:
        """A copy of the lent buffers, offset -> aligned size (for checks and tests)."""
        return dict(self._used)

    def free_blocks(self) -> list[tuple[int, int]]:
        """The free blocks as sorted (start, size) pairs."""
        return [(s, self._sizes[s]) for s in self._starts]
