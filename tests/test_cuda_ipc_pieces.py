"""cuda_ipc checks tensors as they land: which pieces of the copy complete which tensors (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mx_orchestrator.layout import LayoutSpec, plan_layout
from mx_orchestrator.models import ModelIdentity
from strategies.cuda_ipc import _landed_after, _pieces


def manifest(sizes: list[int]):  # type: ignore[no-untyped-def]
    shapes = [(f"t{i}", "U8", (n,)) for i, n in enumerate(sizes)]
    return plan_layout(ModelIdentity("m"), shapes, LayoutSpec("arena"))


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=12),
    piece=st.integers(1, 4000),
    reverse=st.booleans(),
)
def test_every_tensor_is_checked_once_after_the_last_piece_that_writes_it(
    sizes: list[int], piece: int, reverse: bool
) -> None:
    plan = manifest(sizes)
    region_bytes = plan.regions[0].nbytes
    cuts = [(0, at, min(piece, region_bytes - at)) for at in range(0, region_bytes, piece)] or [(0, 0, 0)]
    if reverse:  # a plan of tensor copies may issue them in any order
        cuts.reverse()
    groups = _landed_after(plan, cuts)
    assert sorted(n for g in groups for n in g) == sorted(s.name for s in plan.tensors)
    where = {n: i for i, g in enumerate(groups) for n in g}
    for spec in plan.tensors:
        writers = [
            i for i, (_, o, n) in enumerate(cuts) if o < spec.offset + spec.nbytes and o + n > spec.offset
        ]
        # not before its last byte landed, and not later than that
        assert where[spec.name] == max(writers, default=0)


def test_descriptors_are_cut_into_pieces_that_tile_them_in_order() -> None:
    from strategies import cuda_ipc

    local = ((0, 0, 3 * cuda_ipc.PIECE_BYTES + 5), (1, 7, 0))
    remote = ((1000, 3 * cuda_ipc.PIECE_BYTES + 5), (50, 0))
    pieces = list(_pieces(local, remote))
    assert [p[0][2] for p in pieces] == [cuda_ipc.PIECE_BYTES] * 3 + [5, 0]
    assert [p[1][0] - 1000 for p in pieces[:4]] == [p[0][1] for p in pieces[:4]]
