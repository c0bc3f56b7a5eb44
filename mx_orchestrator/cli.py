"""``mxo``: the command line (serve, pull, sources, demo).

Human-readable output by default; ``--json`` prints exactly one JSON document
on stdout and nothing else (logs and progress go to stderr). Misuse and
environment problems end with one ``mxo: error: ...`` line and a non-zero
exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio

from . import __version__
from .config import (
    check_count,
    check_device,
    check_max_lease,
    check_port,
    check_rate,
    check_seconds,
    check_source_id,
)
from .errors import ConfigError, MxoError
from .logs import configure_logging
from .models import ModelIdentity, SourceRecord
from .registry import open_registry, records_of
from .render import print_report, print_sources, printable, source_rows
from .report import LoadReport
from .selection import NAMED as NAMED_SELECTIONS
from .strategy import Strategy, StrategyOptions, load_strategy

__all__ = ["build_parser", "main"]

DEFAULT_STRATEGIES = "rdma_region,rdma_tensor"

T = TypeVar("T")


def default_registry_url() -> str:
    return os.environ.get("MXO_REGISTRY", "sqlite://")


def _checked(convert: Callable[[str], Any], check: Callable[[Any], T], what: str) -> Callable[[str], T]:
    """An argparse type: the flag is converted, then checked by the same rule as the API's
    (:mod:`mx_orchestrator.config`), so a bad value fails before any work starts."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        try:
            return check(value)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _seconds(name: str) -> Callable[[str], float]:
    return _checked(float, lambda v: check_seconds(name, v), "a number")


_port = _checked(int, lambda v: check_port("port", v), "a port")
_source_id = _checked(str, check_source_id, "a source id")
_device = _checked(str, check_device, "a device")
_gbps = _checked(float, lambda v: check_rate("max_rate", v * 1e9), "a positive number")
_readers = _checked(int, lambda v: check_count("max_readers", v, minimum=0), "a whole number")
#: a republishing pull's largest part: what lands sooner is served sooner (pipelined fan-out)
FANOUT_PART_BYTES = 64 << 20
#: a republishing pull's default stripe: a fleet's targets read parts from several sources at once
#: (``bench/fleet.py``: 1,000 targets within 2 x one target alone at 5, about 7 lease calls a target)
FANOUT_STRIPE = 5

_stripe = _checked(int, lambda v: check_count("stripe", v, maximum=64), "a whole number from 1 to 64")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)  # --help shows defaults
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mxo: error: {message} (see '{self.prog} --help')\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        default=None,
        help="registry URL: sqlite:///PATH (default), redis://HOST:PORT/DB, memory://",
    )
    _diagnostics(p)


def _diagnostics(p: argparse.ArgumentParser) -> None:
    """What every command takes: log level and format, and ``--debug``."""
    p.add_argument("--log-level", default=None, help="debug, info, warning (default; or $MXO_LOG_LEVEL)")
    p.add_argument("--log-format", choices=("console", "json"), default="console")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (or $MXO_DEBUG=1)")


def _identity(args: argparse.Namespace) -> ModelIdentity:
    return ModelIdentity(args.model_id, args.revision or "main", args.shard_rank, args.shard_count)


def _identity_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument(
        "--model-id", required=required, help="model id, e.g. sentence-transformers/all-MiniLM-L6-v2"
    )
    p.add_argument("--revision", default=None, help="revision the weights belong to (default: main)")
    p.add_argument("--shard-rank", type=int, default=0, help="tensor-parallel rank of this shard")
    p.add_argument("--shard-count", type=int, default=1, help="tensor-parallel size")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mxo", description="Get model weights from the best source: NIXL peers or the Hub.")
    parser.add_argument("--version", action="version", version=f"mxo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser(
        "serve", help="hold weights in memory and offer them to peers until SIGINT/SIGTERM"
    )
    _identity_args(serve)
    serve.add_argument("--weights", required=True, type=Path, help="directory of *.safetensors")
    serve.add_argument("--layout", default="arena", help="arena | tensor | chunked:SIZE (default arena)")
    serve.add_argument("--device", type=_device, default="cpu", help="cpu or cuda:N")
    serve.add_argument(
        "--source-id", type=_source_id, default=None, help="stable id for this source (default host-pid)"
    )
    serve.add_argument(
        "--ttl",
        type=_seconds("ttl"),
        default=15.0,
        help="seconds without heartbeat before the record expires",
    )
    serve.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="locality label published with the record (repeatable)",
    )
    serve.add_argument(
        "--metrics-port", type=_port, default=None, help="serve Prometheus metrics on this port"
    )
    serve.add_argument(
        "--max-readers",
        type=_readers,
        default=8,
        help="targets reading at once; one more is refused before any byte moves (0: no cap)",
    )
    serve.add_argument(
        "--max-lease",
        type=_checked(float, check_max_lease, "a number"),
        default=60.0,
        help="the longest reader lease granted (s): a reader that died holds a slot this long at most",
    )
    serve.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="NAME",
        help="network interface the transport listens on and advertises, e.g. lo (repeatable; default: all)",
    )
    _common(serve)
    serve.set_defaults(run=_serve)

    pull = sub.add_parser("pull", help="load a model from the best source and report how")
    _identity_args(pull)
    pull.add_argument("--layout", default="arena", help="target layout: arena | tensor | chunked:SIZE")
    pull.add_argument("--device", type=_device, default="cpu", help="cpu or cuda:N")
    pull.add_argument(
        "--strategies",
        default=None,
        help=(
            f"comma-separated, tried in this order (default: {DEFAULT_STRATEGIES}; "
            "with cuda_ipc first for --device cuda:N and hf_download last when --repo is given)"
        ),
    )
    pull.add_argument(
        "--repo", default=None, help="Hub repo ORG/NAME for hf_download (default: the model id)"
    )
    pull.add_argument("--hub-endpoint", default=None, help="Hub URL (default $HF_ENDPOINT or huggingface.co)")
    pull.add_argument(
        "--timeout", type=_seconds("load_timeout"), default=120.0, help="overall deadline in seconds"
    )
    pull.add_argument(
        "--attempt-timeout",
        type=_seconds("attempt_timeout"),
        default=60.0,
        help="deadline of one attempt in seconds",
    )
    pull.add_argument(
        "--reader-lease",
        type=_seconds("reader_lease"),
        default=10.0,
        help="seconds a reader's count on a source lasts unless renewed (a killed pull's count runs out)",
    )
    pull.add_argument(
        "--selection",
        choices=sorted(NAMED_SELECTIONS),
        default="rendezvous",
        help="how sources are ranked: rendezvous spreads a fleet over every copy, least-loaded takes the "
        "idlest, prefer-seeds keeps reads near the seeds, spare-seeds moves them onto copies (default "
        "%(default)s)",
    )
    pull.add_argument(
        "--stripe",
        type=_stripe,
        default=None,
        metavar="K",
        help="read disjoint parts from up to K sources at once; a failed part alone moves on (default 1; "
        f"{FANOUT_STRIPE} with --republish, as in the fleet bench)",
    )
    pull.add_argument(
        "--hedge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --stripe: ask an idle source for a part in flight past its expected time (default on)",
    )
    pull.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    pull.add_argument(
        "--expect",
        default=None,
        metavar="FINGERPRINT",
        help="load only this content (mxc2-..., from mxo fingerprint); bytes are checked against its digests",
    )
    pull.add_argument("--out", type=Path, default=None, help="write what was loaded as DIR/model.safetensors")
    pull.add_argument("--json", action="store_true", help="print the JSON load report only")
    pull.add_argument(
        "--republish",
        action="store_true",
        help="serve the weights to peers from the first part that landed verified (a partial source), "
        "whole once loaded, until SIGINT/SIGTERM (pipelined fan-out)",
    )
    pull.add_argument(
        "--source-id", type=_source_id, default=None, help="source id when republishing (default host-pid)"
    )
    pull.add_argument(
        "--max-rate",
        type=_gbps,
        default=None,
        metavar="GB/S",
        help="read at most this many GB/s (parts start no sooner than the rate allows; default: no cap)",
    )
    pull.add_argument(
        "--max-readers",
        type=_readers,
        default=8,
        help="when republishing: targets reading from this one at once (0: no cap)",
    )
    _common(pull)
    pull.set_defaults(run=_pull)

    fingerprint = sub.add_parser(
        "fingerprint", help="print the content fingerprint of a checkpoint (for pull --expect)"
    )
    source = fingerprint.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="directory of *.safetensors")
    source.add_argument(
        "--repo",
        default=None,
        help="Hub repo ORG/NAME: download it (sha256-verified against the Hub) and pin that",
    )
    fingerprint.add_argument("--revision", default=None, help="Hub revision (default: main)")
    fingerprint.add_argument(
        "--hub-endpoint", default=None, help="Hub URL (default $HF_ENDPOINT or huggingface.co)"
    )
    fingerprint.add_argument(
        "--json", action="store_true", help="also every tensor's dtype, shape and tree digest"
    )
    _diagnostics(fingerprint)
    fingerprint.set_defaults(run=_fingerprint)

    sources = sub.add_parser("sources", help="list the sources a registry knows")
    sources.add_argument("--model-id", default=None, help="only this model (any revision/shard)")
    sources.add_argument("--json", action="store_true")
    _common(sources)
    sources.set_defaults(run=_sources)

    demo = sub.add_parser("demo", help="the whole story on this machine: real sources, a kill, a pull")
    demo.add_argument("--json", action="store_true")
    demo.add_argument("--scenario", choices=("mixed", "hub-fallback"), default="mixed")
    _diagnostics(demo)
    demo.set_defaults(run=_demo)

    return parser


# -- serve ----------------------------------------------------------------------


def _use_device(device: str, interfaces: Sequence[str] = ()) -> None:
    """Check a ``cuda:N`` device, make it current, then start the NIXL agent on it in the background.

    The agent (~0.5 s on CPU, ~1.2 s on a GPU host, most of it loading UCX) is
    made while the rest of the command starts up.
    """
    from ._backends.nixl import start_agent

    if device == "cpu":
        start_agent(interfaces=tuple(interfaces))
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    torch.cuda.set_device(torch.device(device))
    start_agent(interfaces=tuple(interfaces))  # made on this device: CUDA's current device is per thread


def _serve(args: argparse.Namespace) -> int:
    from .source import WeightSource, load_weights, serve_until_signal

    identity = _identity(args)
    if not args.weights.is_dir():
        raise ConfigError(f"weights directory {str(args.weights)!r} does not exist")
    _use_device(args.device, args.interface)
    labels = {"host": socket.gethostname()}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--label wants KEY=VALUE, got {item!r}")
        labels[key] = value
    weights = load_weights(identity, args.weights, args.layout, args.device)

    async def run() -> None:
        registry = open_registry(args.registry or default_registry_url())
        metrics = None
        if args.metrics_port is not None:
            from .metrics import SourceMetrics, start_metrics_server

            metrics = SourceMetrics()
            start_metrics_server(args.metrics_port)
        source = WeightSource(
            registry,
            weights,
            source_id=args.source_id,
            ttl=args.ttl,
            labels=labels,
            metrics=metrics,
            interfaces=args.interface,
            max_readers=args.max_readers,
            max_lease=args.max_lease,
        )

        def announce(record: SourceRecord) -> None:
            ready = {
                "event": "ready",
                "source_id": record.source_id,
                "generation": record.generation,
                "layout": args.layout,
                "regions": len(weights.spans),
                "bytes": weights.manifest.total_bytes,
            }
            print(json.dumps(ready), flush=True)

        try:
            await serve_until_signal(source, announce)
        finally:
            await registry.aclose()

    anyio.run(run)
    return 0


# -- pull -----------------------------------------------------------------------


def build_strategies(names: Sequence[str], options: StrategyOptions) -> list[Strategy]:
    """Every strategy by name, through the entry points (built-in and third-party alike)."""
    return [load_strategy(name, options) for name in names]


def _default_strategies(args: argparse.Namespace) -> str:
    """CUDA IPC first for a GPU target, then the NIXL strategies, then the Hub when a repo is named."""
    names = ("cuda_ipc," if args.device != "cpu" else "") + DEFAULT_STRATEGIES
    return names + (",hf_download" if args.repo else "")


def _pull(args: argparse.Namespace) -> int:
    from .checkpoint import save_checkpoint
    from .fanout import load_and_serve
    from .pipeline import Orchestrator
    from .progress import ProgressDisplay
    from .target import Target

    identity = _identity(args)
    # checks the flags and allocates nothing
    target = Target(args.layout, args.device, verify=not args.no_verify)
    if args.out is not None:
        _check_out(args.out)
    _use_device(args.device)  # before any strategy starts the transport's agent
    import torch  # noqa: F401  # start-up work (~1 s, beside the agent's creation), not inside the load

    names = [n.strip() for n in (args.strategies or _default_strategies(args)).split(",") if n.strip()]
    if not names:
        raise ConfigError("--strategies names no strategy")
    strategies = build_strategies(
        names,
        StrategyOptions(
            repo_id=args.repo or args.model_id, revision=args.revision, hub_endpoint=args.hub_endpoint
        ),
    )
    needs_registry = any(s.uses_peers for s in strategies) or args.republish

    printed: list[LoadReport] = []

    def finished(report: LoadReport) -> None:
        """The load's report, out as soon as the load ends (a republishing pull serves on)."""
        printed.append(report)
        if args.json:
            print(report.to_json(indent=2), flush=True)
        else:
            print_report(report)
        if report.loaded and args.out is not None:
            # the report is out first: a write that fails now loses nothing of what the load learned
            save_checkpoint(target.tensors(), args.out / "model.safetensors")

    async def run() -> LoadReport:
        registry = open_registry(args.registry or default_registry_url()) if needs_registry else None
        try:
            if registry is not None:
                # fail fast with one clear line when the registry the user named is unusable
                await registry.list(identity.key)
            display = ProgressDisplay(enabled=False if args.json else None)
            async with Orchestrator(
                registry,
                strategies,
                attempt_timeout=args.attempt_timeout,
                load_timeout=args.timeout,
                observers=[display],
                expect=args.expect,
                reader_lease=args.reader_lease,
                stripe=args.stripe or (FANOUT_STRIPE if args.republish else 1),
                hedge=args.hedge,
                selection=NAMED_SELECTIONS[args.selection],
                max_part_bytes=FANOUT_PART_BYTES if args.republish else None,
                max_rate=args.max_rate,  # bytes/s (the flag's GB/s, converted when parsed)
            ) as orchestrator:
                if not args.republish:
                    report = await _until_signal(orchestrator.load(identity, target, progress=display))
                    finished(report)
                    return report
                # a partial source from its first landed part, whole once loaded, until a signal
                assert registry is not None
                return await _serve_after(
                    printed,
                    load_and_serve(
                        orchestrator,
                        identity,
                        target,
                        registry,
                        on_report=finished,
                        on_serving=lambda source: print(
                            f"[mxo] serving as {source.source_id}"
                            f"{' (partial)' if source.holdings is not None else ''}",
                            file=sys.stderr,
                            flush=True,
                        ),
                        source_id=args.source_id,
                        max_readers=args.max_readers,
                    ),
                )
        finally:
            if registry is not None:
                with anyio.CancelScope(shield=True):
                    await registry.aclose()

    report = anyio.run(run)
    return 0 if report.loaded else 1


async def _serve_after(printed: list[LoadReport], work: Awaitable[LoadReport]) -> LoadReport:
    """``work`` until it returns or a signal comes; a signal after a successful load is the normal
    end of serving (exit 0), before it an interruption."""
    try:
        return await _until_signal(work)
    except Interrupted:
        if printed and printed[0].loaded:
            return printed[0]
        raise


class Interrupted(MxoError):
    """SIGTERM or SIGINT ended the command; what it held (reader leases, connections) was given back."""

    def __init__(self, signum: int) -> None:
        super().__init__(
            f"interrupted by {signal.Signals(signum).name}; reader leases and connections released"
        )
        self.signum = signum


async def _until_signal(work: Awaitable[T]) -> T:
    """``await work``; on SIGTERM or SIGINT it is cancelled cleanly (every ``finally`` runs): Interrupted."""
    result: list[T] = []
    received: list[int] = []

    async def run(scope: anyio.CancelScope) -> None:
        result.append(await work)
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, tg.cancel_scope)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                received.append(signum)
                tg.cancel_scope.cancel()
                break
    if received:
        raise Interrupted(received[0])
    return result[0]


def _check_out(out: Path) -> None:
    """``--out``: made (or found) now and proved writable with a probe file, before any byte moves;
    ``model.safetensors`` in it, if there, is a regular file to replace."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".mxo-probe-"):
            pass
    except OSError as exc:  # a dangling link, /proc, a read-only file system, no permission
        raise ConfigError(f"--out {out}: not a writable directory ({exc.strerror or exc})") from None
    written = out / "model.safetensors"
    if written.is_symlink() or (written.exists() and not written.is_file()):
        raise ConfigError(f"--out {out}: {written} exists and is not a regular file")


# -- sources --------------------------------------------------------------------


def _sources(args: argparse.Namespace) -> int:
    records = anyio.run(records_of, args.registry or default_registry_url(), args.model_id)
    rows = source_rows(records)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_sources(rows)
    return 0


# -- fingerprint ----------------------------------------------------------------


def _fingerprint(args: argparse.Namespace) -> int:
    """Pin a checkpoint on disk, or what the Hub serves ("trust the Hub's bytes, fetch them from peers")."""
    from .checkpoint import fingerprint_directory

    if args.repo is not None:
        fingerprint, tensors = _fingerprint_hub(args)
    else:
        fingerprint, tensors = fingerprint_directory(args.weights)
    if args.json:
        print(json.dumps({"fingerprint": fingerprint, "tensors": tensors}, indent=2))
    else:
        print(fingerprint)
    return 0


def _fingerprint_hub(args: argparse.Namespace) -> tuple[str, dict[str, dict[str, object]]]:
    from .integrity import pin_of
    from .pipeline import Orchestrator
    from .target import Target

    options = StrategyOptions(repo_id=args.repo, revision=args.revision, hub_endpoint=args.hub_endpoint)
    target = Target("arena", verify=True)
    report = anyio.run(
        Orchestrator(None, [load_strategy("hf_download", options)]).load, ModelIdentity(args.repo), target
    )
    if not report.loaded or not report.to_dict()["verified"]:
        raise MxoError(f"{args.repo}: the Hub download was not loaded and sha256-verified ({report.reason})")
    return pin_of(target.tensors())


# -- demo ----------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(scenario=args.scenario, as_json=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """The edge of the program: every problem ends in one ``mxo: error:`` line (``--debug`` or
    ``MXO_DEBUG=1`` adds the traceback); exit 2 for usage and configuration, 1 for a failed load."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False) or os.environ.get("MXO_DEBUG"))
    configure_logging(args.log_level, args.log_format)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the one place that turns anything into one line
        error = _leaf(exc)
        if isinstance(error, Interrupted):
            print(f"mxo: {error}", file=sys.stderr)
            return 128 + error.signum
        if debug:
            import traceback

            traceback.print_exception(exc)
        if isinstance(error, (MxoError, OSError)):
            print(f"mxo: error: {printable(error)}", file=sys.stderr)
            return 2
        hint = "" if debug else " (run with --debug for the traceback)"
        print(f"mxo: error: {type(error).__name__}: {printable(error)}{hint}", file=sys.stderr)
        return 1


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, which task groups raise."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
