"""The NIXL edge: the only module that imports nixl.

It owns one agent per process (creating one costs ~0.5 s), serialises calls
into it (NIXL's default thread-sync mode is NONE and concurrent calls have
crashed it), registers memory, imports remote metadata, posts READs from a
worker thread and polls them against a deadline, and maps NIXL's exceptions to
typed results. Every transfer handle, remote agent and registration it creates
is counted, so tests can assert that nothing leaks.

Settings (see ../shared/NOTES.md for the measurements behind them): no NIXL
progress thread by default (it spins a whole core even when idle; sources poll
notifications themselves), no listener thread (metadata travels through our
registry), UCX with its default ``peer`` error handling (a dead peer is
detected within milliseconds).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

__all__ = [
    "NixlAgent",
    "NixlError",
    "NixlStats",
    "TransferResult",
    "get_agent",
    "nixl_available",
]

_SLICE_SECONDS = 0.05


class NixlError(Exception):
    """NIXL is missing or failed outside a transfer (agent creation, registration)."""


def nixl_available() -> bool:
    try:
        import nixl._api  # noqa: F401
    except Exception:  # ImportError, or a broken native library
        return False
    return True


def _error_kind(exc: BaseException) -> str:
    """Classify a NIXL exception by its type name (the bindings' classes are not importable by name)."""
    name = type(exc).__name__
    if "RemoteDisconnect" in name:
        return "disconnect"
    if "NotFound" in name:
        return "not_found"
    if "InvalidParam" in name:
        return "invalid_param"
    if "Backend" in name:
        return "backend"
    return "other"


@dataclass(frozen=True)
class TransferResult:
    """How a READ ended: ``done``, ``disconnect`` (remote side failed), ``timeout`` or ``error``."""

    status: str
    seconds: float
    detail: str = ""


@dataclass
class NixlStats:
    handles_open: int = 0
    remote_agents: int = 0
    registrations: int = 0
    transfers: int = 0


class NixlAgent:
    def __init__(
        self,
        name: str,
        *,
        progress_thread: bool = False,
        error_handling: str = "peer",
    ) -> None:
        # NIXL logs every agent and backend creation at INFO on stderr; keep it
        # quiet unless the user asked otherwise
        os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
        # UCX logs to stdout by default, which would corrupt `--json` output
        os.environ.setdefault("UCX_LOG_FILE", "/dev/stderr")
        try:
            import torch  # noqa: F401  # nixl recognises tensors only when torch is imported
            from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
        except Exception as exc:
            raise NixlError(f"nixl is not available: {exc}") from exc
        config = nixl_agent_config(
            enable_prog_thread=progress_thread,
            enable_listen_thread=False,
            backends=[],
            sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        try:
            self._agent = nixl_agent(name, config)
            params = {} if error_handling == "peer" else {"ucx_error_handling_mode": error_handling}
            self._agent.create_backend("UCX", params)
        except Exception as exc:
            raise NixlError(f"cannot create NIXL agent {name!r}: {exc}") from exc
        self.name = name
        self.stats = NixlStats()
        self._remotes: dict[str, int] = {}  # remote name -> references
        self._stuck: list[Any] = []
        self._lock = threading.RLock()

    # -- metadata and memory --------------------------------------------------

    def metadata(self) -> bytes:
        with self._lock:
            return bytes(self._agent.get_agent_metadata())

    def register(self, descs: Sequence[tuple[int, int, int]], mem_type: str) -> Callable[[], None]:
        """Register ``(address, nbytes, device)`` blocks; returns the function that deregisters them."""
        rows = [(int(a), int(n), int(d), "") for a, n, d in descs if n > 0]
        if not rows:
            return lambda: None
        with self._lock:
            try:
                reg = self._agent.register_memory(rows, mem_type)
            except Exception as exc:
                raise NixlError(f"memory registration failed: {exc}") from exc
            self.stats.registrations += 1
        released = False

        def deregister() -> None:
            nonlocal released
            if released:
                return
            released = True
            with self._lock:
                self._agent.deregister_memory(reg)
                self.stats.registrations -= 1

        return deregister

    def add_remote(self, metadata: bytes) -> str:
        """Load a peer's metadata; raises the NIXL exception on failure (caller maps it)."""
        with self._lock:
            raw = self._agent.add_remote_agent(metadata)
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            if name == self.name:
                raise NixlError("refusing a remote agent with our own name")
            self._remotes[name] = self._remotes.get(name, 0) + 1
            self.stats.remote_agents = len(self._remotes)
            return name

    def remove_remote(self, name: str) -> None:
        with self._lock:
            count = self._remotes.get(name, 0)
            if count <= 1:
                self._remotes.pop(name, None)
                # already gone after a disconnect: nothing left to release
                with contextlib.suppress(Exception):
                    self._agent.remove_remote_agent(name)
            else:
                self._remotes[name] = count - 1
            self.stats.remote_agents = len(self._remotes)

    def poll_notifications(self) -> int:
        """Drive UCX progress on a source; returns how many notifications arrived."""
        with self._lock:
            notifs = self._agent.get_new_notifs()
        return sum(len(v) for v in notifs.values())

    # -- transfers ------------------------------------------------------------

    async def read(
        self,
        remote: str,
        local_descs: np.ndarray[Any, Any],
        remote_descs: np.ndarray[Any, Any],
        *,
        local_mem: str,
        remote_mem: str,
        deadline: float,
    ) -> TransferResult:
        """READ ``remote_descs`` of ``remote`` into ``local_descs`` before ``deadline`` (anyio clock).

        The handle is always released, also on timeout and cancellation; after a
        timeout the bytes that landed are untrusted.
        """
        began = anyio.current_time()
        handle: Any = None
        try:
            with self._lock:
                local = self._agent.get_xfer_descs(local_descs, local_mem)
                remote_list = self._agent.get_xfer_descs(remote_descs, remote_mem)
                handle = self._agent.initialize_xfer("READ", local, remote_list, remote)
                self.stats.handles_open += 1

            # Completion is awaited in a worker thread in short slices: GPU reads
            # return PROC at once and finish within milliseconds, and polling from
            # the event loop would add its wake-up latency to every transfer.
            # Between slices the event loop gets a checkpoint, so cancellation
            # reaches us within one slice.
            def wait_slice(state: str, budget: float) -> str:
                end = time.monotonic() + min(budget, _SLICE_SECONDS)
                while state == "PROC" and time.monotonic() < end:
                    time.sleep(0)  # let the GIL go to the event loop between checks
                    with self._lock:
                        state = str(self._agent.check_xfer_state(handle))
                return state

            def post() -> str:
                if local_mem == "VRAM":
                    _bind_cuda_device(int(local_descs[0][2]) if len(local_descs) else 0)
                # with cma the copy happens inside this call: keep it off the event loop
                with self._lock:
                    state = str(self._agent.transfer(handle))
                return wait_slice(state, wall_deadline - time.monotonic())

            # the worker thread cannot read anyio's clock: carry the deadline over
            wall_deadline = time.monotonic() + (deadline - anyio.current_time())
            state = await anyio.to_thread.run_sync(post)
            while state == "PROC":
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    return TransferResult(
                        "timeout", anyio.current_time() - began, "transfer still in progress"
                    )
                state = await anyio.to_thread.run_sync(wait_slice, state, remaining)
            self.stats.transfers += 1
            seconds = anyio.current_time() - began
            if state == "DONE":
                return TransferResult("done", seconds)
            return TransferResult("error", seconds, f"transfer ended in state {state}")
        except Exception as exc:
            kind = _error_kind(exc)
            status = "disconnect" if kind in ("disconnect", "not_found") else "error"
            return TransferResult(status, anyio.current_time() - began, f"{type(exc).__name__}: {exc}")
        finally:
            if handle is not None:
                self._release(handle)

    def _release(self, handle: Any) -> None:
        # An in-flight READ to a frozen peer may refuse to cancel at first: retry
        # briefly; a handle that still refuses is kept and retried on later calls.
        with self._lock:
            pending = [*self._stuck, handle]
            self._stuck = []
            for h in pending:
                for _ in range(20):
                    try:
                        self._agent.release_xfer_handle(h)
                    except Exception:
                        time.sleep(0.005)
                        continue
                    self.stats.handles_open -= 1
                    break
                else:
                    self._stuck.append(h)


_thread_devices = threading.local()


def _bind_cuda_device(device: int) -> None:
    """Make ``device``'s context current in this worker thread, once per thread.

    UCX's cuda_ipc works in whatever context is current; a fresh worker thread
    has none, and setting one up inside every transfer costs milliseconds.
    """
    if getattr(_thread_devices, "device", None) != device:
        import torch

        torch.cuda.set_device(device)
        _thread_devices.device = device


_agent: NixlAgent | None = None
_agent_lock = threading.Lock()


def get_agent(name: str | None = None, **options: Any) -> NixlAgent:
    """The process-wide agent, created on first use (raises :class:`NixlError` without nixl)."""
    global _agent
    with _agent_lock:
        if _agent is None:
            import uuid

            _agent = NixlAgent(name or f"mxo-{os.getpid()}-{uuid.uuid4().hex[:8]}", **options)
        return _agent
