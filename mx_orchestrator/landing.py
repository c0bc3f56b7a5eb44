"""What landed: checked (against the pin's digests, or the source's checksums) and turned into an outcome.

Every peer strategy ends a transfer here: :func:`landed_check` says what checks
the bytes (nothing, for a target that does not verify), :func:`landed_outcome`
what the verdict means (``Loaded``, verified or not, or ``Corrupt`` naming the
tensors), :func:`verify_landed` both, with the check timed as ``verify``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from functools import partial
from typing import Literal

import anyio

from .kernels import where_digests_run
from .outcomes import Corrupt, Loaded, Outcome
from .pullplan import PullPlan
from .strategy import AttemptContext
from .target import Target

__all__ = ["landed_check", "landed_outcome", "verify_landed"]


async def verify_landed(
    plan: PullPlan,
    target: Target,
    ctx: AttemptContext,
    strategy: str,
    seconds: float,
    began: float,
    detail: str,
    names: Collection[str] | None = None,
) -> Outcome:
    """The outcome of a plan's bytes that landed: against the pin's digests when pinned, else the
    source's checksums; ``names``: only those tensors landed (a part), the rest are not checked.

    A pinned load is never ``verified`` unless every digest was checked (a pin
    is verified even with ``verify=False``: it is the caller's explicit demand).
    """
    if names is None:  # what landed: the target's tensors (a module target may take a subset)
        names = [spec.name for spec in plan.local_manifest.tensors]
    check = landed_check(plan, target, ctx)
    if check is None:
        return landed_outcome(plan, ctx, strategy, seconds, began, detail, "unchecked")
    with ctx.phases.timed("verify"):
        bad = await anyio.to_thread.run_sync(check, names)
    detail += f"; checked by the {where_digests_run(target.device)}"
    return landed_outcome(plan, ctx, strategy, seconds, began, detail, bad)


def landed_check(
    plan: PullPlan, target: Target, ctx: AttemptContext
) -> Callable[[Collection[str]], list[str] | None] | None:
    """What checks landed tensors for this attempt (blocking; give it names): the pin's digests
    when pinned, else the source's checksums; ``None`` when nothing is to be checked."""
    if ctx.expect is not None:
        return partial(target.verify_pinned, plan.source)
    if not target.verify:
        return None
    return partial(target.verify_against, plan.source)


def landed_outcome(
    plan: PullPlan,
    ctx: AttemptContext,
    strategy: str,
    seconds: float,
    began: float,
    detail: str,
    bad: list[str] | Literal["unchecked"] | None,
) -> Outcome:
    """The outcome of landed bytes given their check's verdict (:func:`landed_check`): the tensors
    that failed, ``None`` when the source shares no checksum with us, ``"unchecked"`` when the
    target does not verify."""
    source, total = plan.source, plan.nbytes
    if ctx.progress is not None:
        ctx.progress(total, total)
    sid = ctx.source_id
    what = "SHA-256 tree digests of the pinned content" if ctx.expect is not None else "checksums"
    if bad == "unchecked":
        return Loaded(strategy=strategy, source_id=sid, bytes_moved=total, seconds=seconds, detail=detail)
    if bad is None:
        detail += f"; unverified: no checksum shared with the source ({source.checksum_algorithm})"
        return Loaded(strategy=strategy, source_id=sid, bytes_moved=total, seconds=seconds, detail=detail)
    if bad:
        return Corrupt(
            strategy=strategy,
            source_id=sid,
            bytes_moved=total,
            seconds=anyio.current_time() - began,
            bad_tensors=tuple(bad),
            detail=f"{len(bad)} tensors failed their {what}, e.g. {bad[:3]}",
        )
    detail += f"; {what} verified in {ctx.phases.seconds.get('verify', 0.0):.3f}s"
    return Loaded(
        strategy=strategy, source_id=sid, bytes_moved=total, seconds=seconds, verified=True, detail=detail
    )
