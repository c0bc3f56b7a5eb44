"""The NIXL edge: the only module that imports nixl; an :class:`~.rdma.RdmaAgent`.

It owns one agent per process (creating one costs ~0.5 s on CPU, ~1.2 s on a
GPU host), serialises calls into it (NIXL's default thread-sync mode is NONE
and concurrent calls have crashed it), registers memory, imports remote
metadata, posts READs from a worker thread and polls them against a deadline.
NIXL's exceptions are mapped here, once, by class, to the outcome types they
mean (:data:`_READ_FAILURES`). Every transfer handle, remote agent and
registration it creates is counted in :attr:`NixlAgent.stats`, so tests can
assert that nothing leaks.

Settings (see ../shared/NOTES.md for the measurements behind them): no NIXL
progress thread by default (it spins a whole core even when idle; sources poll
notifications themselves), no listener thread (metadata travels through our
registry), UCX with its default ``peer`` error handling (a dead peer is
detected within milliseconds).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import anyio
import numpy as np

from ..errors import ConfigError
from ..outcomes import LocalFailure, SourceFailed, SourceUnreachable, TimedOut
from . import EdgeFailure
from .rdma import AgentStats, Descriptor, Release

__all__ = ["NixlAgent", "agent_creation_seconds", "agent_ready", "get_agent", "start_agent"]

_SLICE_SECONDS = 0.05


def _bindings() -> Any:
    """NIXL's API and bindings modules (the bindings hold its exception classes)."""
    import torch  # noqa: F401  # nixl recognises tensors only when torch is imported
    from nixl import _api

    return _api


class NixlAgent:
    def __init__(
        self,
        name: str,
        *,
        progress_thread: bool = False,
        error_handling: str = "peer",
        interfaces: Sequence[str] = (),
    ) -> None:
        """``interfaces``: the network devices UCX may listen on and advertise (e.g. ``("lo",)``);
        empty: UCX's choice (every interface)."""
        if interfaces:
            missing = [i for i in interfaces if not os.path.exists(f"/sys/class/net/{i}")]
            if missing:
                raise ConfigError(f"no network interface {missing[0]!r} on this machine")
            # read by UCX when the backend below creates its context: nothing else is advertised
            os.environ["UCX_NET_DEVICES"] = ",".join(interfaces)
        # NIXL logs every agent and backend creation at INFO on stderr; keep it
        # quiet unless the user asked otherwise
        os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
        # UCX logs to stdout by default, which would corrupt `--json` output
        os.environ.setdefault("UCX_LOG_FILE", "/dev/stderr")
        # UCX prints its own ERROR lines for a peer that went away, which the outcome
        # already reports; $MXO_TRANSPORT_LOGS=1 shows them
        if not os.environ.get("MXO_TRANSPORT_LOGS"):
            os.environ.setdefault("UCX_LOG_LEVEL", "fatal")
        try:
            api = _bindings()
        except (ImportError, OSError) as exc:  # not installed, or its native library is broken
            raise ConfigError(f"nixl is not available: {exc}") from exc
        errors = api.nixlBind
        self._nixl_errors: tuple[type[BaseException], ...] = tuple(
            getattr(errors, n) for n in dir(errors) if n.startswith("nixl") and n.endswith("Error")
        )
        self._read_failures: tuple[tuple[type[BaseException], type[Any]], ...] = (
            (errors.nixlRemoteDisconnectError, SourceFailed),
            (errors.nixlNotFoundError, SourceFailed),  # the remote agent vanished
        )
        config = api.nixl_agent_config(
            enable_prog_thread=progress_thread,
            enable_listen_thread=False,
            backends=[],
            sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        try:
            self._agent = api.nixl_agent(name, config)
            params = {} if error_handling == "peer" else {"ucx_error_handling_mode": error_handling}
            self._agent.create_backend("UCX", params)
        except self._nixl_errors as exc:
            raise ConfigError(f"cannot create NIXL agent {name!r}: {exc}") from exc
        self.name = name
        self.stats = AgentStats()
        self._remotes: dict[str, int] = {}  # remote name -> references
        self._stuck: list[Any] = []
        self._lock = threading.RLock()

    # -- metadata and memory --------------------------------------------------

    def metadata(self) -> bytes:
        with self._lock:
            return bytes(self._agent.get_agent_metadata())

    def register(self, blocks: Sequence[Descriptor], mem_type: str) -> Release:
        rows = [(int(a), int(n), int(d), "") for a, n, d in blocks if n > 0]
        if not rows:
            return lambda: None
        with self._lock:
            try:
                reg = self._agent.register_memory(rows, mem_type)
            except self._nixl_errors as exc:
                raise EdgeFailure(LocalFailure, f"memory registration failed: {exc}") from exc
            self.stats.registrations += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            with self._lock:
                self._agent.deregister_memory(reg)
                self.stats.registrations -= 1

        return release

    def connect(self, metadata: bytes) -> str:
        with self._lock:
            try:
                raw = self._agent.add_remote_agent(metadata)
            except self._nixl_errors as exc:
                raise EdgeFailure(SourceUnreachable, f"connect failed: {type(exc).__name__}: {exc}") from exc
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            if name == self.name:
                raise EdgeFailure(SourceUnreachable, "the metadata names this very agent")
            self._remotes[name] = self._remotes.get(name, 0) + 1
            self.stats.remote_agents = len(self._remotes)
            return name

    def disconnect(self, name: str) -> None:
        with self._lock:
            count = self._remotes.get(name, 0)
            if count <= 1:
                self._remotes.pop(name, None)
                # already gone after a disconnect: nothing left to release
                with contextlib.suppress(*self._nixl_errors):
                    self._agent.remove_remote_agent(name)
            else:
                self._remotes[name] = count - 1
            self.stats.remote_agents = len(self._remotes)

    def poll_notifications(self) -> int:
        with self._lock:
            notifs = self._agent.get_new_notifs()
        return sum(len(v) for v in notifs.values())

    # -- transfers ------------------------------------------------------------

    def _failure(self, exc: BaseException) -> EdgeFailure:
        for cls, kind in self._read_failures:
            if isinstance(exc, cls):
                return EdgeFailure(kind, f"{type(exc).__name__}: {exc}")
        # any other NIXL error during a transfer: the remote side's doing as far as we can tell
        return EdgeFailure(SourceFailed, f"{type(exc).__name__}: {exc}")

    async def read(
        self,
        remote: str,
        local: np.ndarray[Any, Any],
        remote_blocks: np.ndarray[Any, Any],
        *,
        local_mem: str,
        remote_mem: str,
        deadline: float,
    ) -> float:
        began = anyio.current_time()
        handle: Any = None
        try:
            with self._lock:
                local_list = self._agent.get_xfer_descs(local, local_mem)
                remote_list = self._agent.get_xfer_descs(remote_blocks, remote_mem)
                handle = self._agent.initialize_xfer("READ", local_list, remote_list, remote)
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
                    _bind_cuda_device(int(local[0][2]) if len(local) else 0)
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
                    raise EdgeFailure(TimedOut, "transfer still in progress at the deadline")
                state = await anyio.to_thread.run_sync(wait_slice, state, remaining)
            self.stats.transfers += 1
            if state != "DONE":
                raise EdgeFailure(SourceFailed, f"transfer ended in state {state}")
            return anyio.current_time() - began
        except self._nixl_errors as exc:
            raise self._failure(exc) from exc
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
                    except self._nixl_errors:
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


class _WarmAgent:
    """The process-wide agent, created once in a background thread as soon as anyone asks.

    Creating an agent costs ~0.5 s on CPU and ~1.2 s on a GPU host (most of it
    importing torch and loading UCX); starting it early lets discovery,
    evaluation and allocation run meanwhile. The thread ends when the agent
    exists (or failed to); cancelling a waiter does not stop it, so a cancelled
    prewarm leaves a finished thread, not a half-made agent.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._agent: NixlAgent | None = None
        self._error: ConfigError | None = None
        self._options: dict[str, Any] = {}
        #: how long making the agent took (``None`` until it is made)
        self.created_seconds: float | None = None

    def start(self, name: str | None = None, **options: Any) -> None:
        options = {k: v for k, v in options.items() if v}  # an empty setting is the default
        with self._lock:
            if self._thread is not None or self._ready.is_set():
                if options and options != self._options:
                    raise ConfigError(
                        f"this process's transport agent already exists with other settings ({self._options})"
                    )
                return
            self._options = dict(options)
            agent_name = name or f"mxo-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            # CUDA's current device is per thread: the agent is made on the caller's
            device = _current_cuda_device()
            self._thread = threading.Thread(
                # not a daemon: a process that exits while the agent is being made waits for
                # it (killing the thread inside NIXL's C++ aborts the whole process)
                target=self._create,
                args=(agent_name, device, options),
                name="mxo-nixl-agent",
                daemon=False,
            )
            self._thread.start()

    def _create(self, name: str, device: int | None, options: dict[str, Any]) -> None:
        began = time.perf_counter()
        try:
            if device is not None:
                _bind_cuda_device(device)
            self._agent = NixlAgent(name, **options)
            self.created_seconds = time.perf_counter() - began
        except ConfigError as exc:
            self._error = exc
        finally:
            self._ready.set()

    def get(self, name: str | None = None, **options: Any) -> NixlAgent:
        self.start(name, **options)
        self._ready.wait()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._agent is not None
        return self._agent

    async def wait(self) -> NixlAgent:
        """The agent, awaited without blocking the event loop (cancellation-safe)."""
        self.start()
        if not self._ready.is_set():
            await anyio.to_thread.run_sync(self._ready.wait, abandon_on_cancel=True)
        return self.get()


def _current_cuda_device() -> int | None:
    """The calling thread's CUDA device when this process already uses CUDA, else ``None``."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.current_device())


_warm = _WarmAgent()


def agent_creation_seconds() -> float | None:
    """How long the process-wide agent took to make (``None`` until it exists)."""
    return _warm.created_seconds


def start_agent(name: str | None = None, **options: Any) -> None:
    """Begin creating the process-wide agent in the background (idempotent, returns at once)."""
    _warm.start(name, **options)


def get_agent(name: str | None = None, **options: Any) -> NixlAgent:
    """The process-wide agent, created on first use (raises :class:`ConfigError` without nixl)."""
    return _warm.get(name, **options)


async def agent_ready() -> NixlAgent:
    """The process-wide agent, waiting for its creation off the event loop."""
    return await _warm.wait()
