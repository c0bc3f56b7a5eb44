"""The I/O edges: the only modules that talk to NIXL and to the Hub.

Each edge maps its failures once, to the outcome type they mean, by raising
:class:`EdgeFailure`; callers turn it into an outcome with
:meth:`EdgeFailure.outcome` and never inspect third-party exceptions or status
strings themselves (httpcore's ``map_exceptions`` is the model).

* :mod:`.rdma`: the :class:`~.rdma.RdmaAgent` contract (register, connect,
  read against a deadline, release); its fake is
  :class:`mx_orchestrator.testing.FakeRdmaAgent`;
* :mod:`.nixl`: the NIXL implementation, the only module that imports nixl;
* :mod:`.hub`: the HuggingFace Hub client, the only module that imports huggingface_hub.
"""

from __future__ import annotations

from typing import Any

from ..outcomes import Outcome

__all__ = ["EdgeFailure"]


class EdgeFailure(Exception):
    """An I/O failure already mapped to the outcome type it means (``SourceFailed``, ``TimedOut``...).

    ``retry`` says whether the same request may be tried again within the
    attempt (transient errors); ``fields`` are extra outcome fields such as
    ``bad_tensors``.
    """

    def __init__(self, kind: type[Outcome], detail: str, *, retry: bool = False, **fields: Any) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.retry = retry
        self.fields = fields

    def outcome(self, strategy: str, source_id: str | None, seconds: float, bytes_moved: int = 0) -> Outcome:
        return self.kind(
            strategy=strategy,
            source_id=source_id,
            seconds=seconds,
            bytes_moved=bytes_moved,
            detail=self.detail,
            **self.fields,
        )
