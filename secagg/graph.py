"""SecAgg+ neighbour graph: a Harary graph H(n, k) over a public random permutation.

Bell et al. (CCS 2020, sec. 3) replace the complete graph of SecAgg by a k-regular graph with
k = O(log n). We use the Harary graph (position p is joined to p +- 1 .. p +- k/2 mod n, k even)
with node labels permuted by a Fisher-Yates shuffle driven by a ChaCha20 keystream keyed with
the server's 32-byte public seed, so every party computes the same graph. For k >= n - 1 the
graph is complete.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedpeft.secagg.errors import SecAggConfigError
from fedpeft.secagg.prg import KeystreamReader


def public_permutation(items: Sequence[int], seed: bytes) -> list[int]:
    """Uniform permutation of ``items`` drawn from ChaCha20(``seed``) (Fisher-Yates)."""
    out = list(items)
    reader = KeystreamReader(seed)
    for i in range(len(out) - 1, 0, -1):
        j = reader.randbelow(i + 1)
        out[i], out[j] = out[j], out[i]
    return out


def neighbour_graph(participants: Sequence[int], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Neighbours of each participant (sorted, distinct ids) in the public graph."""
    n = len(participants)
    if n < 2 or len(set(participants)) != n:
        raise SecAggConfigError(f"participants (n={n}) must be >= 2 distinct ids")
    if degree >= n - 1:
        everyone = frozenset(participants)
        return {p: everyone - {p} for p in participants}
    if degree < 2 or degree % 2:
        raise SecAggConfigError(f"degree={degree} must be even and >= 2 when below n - 1 = {n - 1}")
    order = public_permutation(sorted(participants), seed)
    half = degree // 2
    return {
        order[pos]: frozenset(order[(pos + d) % n] for d in range(-half, half + 1) if d != 0)
        for pos in range(n)
    }
