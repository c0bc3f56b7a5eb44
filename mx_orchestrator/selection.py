"""Candidate ranking: pure functions that order sources for one target.

A selection policy takes the target's id and returns a sort key over
candidates (lower sorts first). Rendezvous (highest-random-weight) hashing is
the default: every target gets a stable, different order, so a fleet of
targets spreads over the sources without talking to each other, and removing
one source only moves the targets that had ranked it first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

from .models import Candidate

__all__ = [
    "NAMED",
    "RankKey",
    "SelectionPolicy",
    "least_loaded",
    "prefer_labels",
    "prefer_seeds",
    "rendezvous",
    "rendezvous_score",
    "spare_seeds",
]

RankKey = Callable[[Candidate], tuple[float, ...]]
SelectionPolicy = Callable[[str], RankKey]


def rendezvous_score(target_id: str, source_id: str) -> int:
    digest = hashlib.blake2b(f"{target_id}\x00{source_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous(target_id: str) -> RankKey:
    """Sources below their reader cap first, then highest rendezvous score first."""

    def key(candidate: Candidate) -> tuple[float, ...]:
        full = candidate.record.listed_full
        return (float(full), -float(rendezvous_score(target_id, candidate.source_id)))

    return key


def least_loaded(target_id: str) -> RankKey:
    """Fewest active readers first; rendezvous order among equals."""
    tie_break = rendezvous(target_id)

    def key(candidate: Candidate) -> tuple[float, ...]:
        return (float(candidate.record.load), *tie_break(candidate))

    return key


def prefer_labels(labels: Mapping[str, str], then: SelectionPolicy = rendezvous) -> SelectionPolicy:
    """Sources sharing more of ``labels`` (host, rack, zone...) first, then ``then``."""
    wanted = dict(labels)

    def policy(target_id: str) -> RankKey:
        inner = then(target_id)

        def key(candidate: Candidate) -> tuple[float, ...]:
            shared = sum(1 for k, v in wanted.items() if candidate.record.labels.get(k) == v)
            return (-float(shared), *inner(candidate))

        return key

    return policy


def prefer_seeds(then: SelectionPolicy = rendezvous) -> SelectionPolicy:
    """Fewest fan-out hops first (seeds, then their first copies...), then ``then``.

    The default ``rendezvous`` ignores hops, which spreads a fleet over every copy
    (fan-out grows like log N); this keeps reads close to the seeds instead.
    """

    def policy(target_id: str) -> RankKey:
        inner = then(target_id)

        def key(candidate: Candidate) -> tuple[float, ...]:
            return (float(candidate.record.hops), *inner(candidate))

        return key

    return policy


def spare_seeds(then: SelectionPolicy = rendezvous) -> SelectionPolicy:
    """Most fan-out hops first (copies before the seeds they came from), then ``then``.

    For fleets whose seeds are scarce (the origin also serves traffic, or loaded from
    the Hub once for everyone): once copies exist, reads move off the seeds, and a
    seed's slots go to the targets that find no copy yet.
    """

    def policy(target_id: str) -> RankKey:
        inner = then(target_id)

        def key(candidate: Candidate) -> tuple[float, ...]:
            return (-float(candidate.record.hops), *inner(candidate))

        return key

    return policy


#: The selections the CLI offers by name (``mxo pull --selection NAME``).
NAMED: dict[str, SelectionPolicy] = {
    "rendezvous": rendezvous,
    "least-loaded": least_loaded,
    "prefer-seeds": prefer_seeds(),
    "spare-seeds": spare_seeds(),
}
