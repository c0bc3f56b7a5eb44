"""Careless input at the edge of the program: one line naming the file or flag, the right exit code, no traceback,
nothing published, nothing moved."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mx_orchestrator import ConfigError, ModelIdentity, Orchestrator
from mx_orchestrator.errors import CheckpointError
from mx_orchestrator.source import load_weights
from mx_orchestrator.testing import FakeStrategy, succeed
from mx_orchestrator.testing.peers import MODEL_ID, Peers
from tests.conftest import Mxo

IDENTITY = ModelIdentity("acme/careless")


def assert_one_line(out: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("mxo: error:")]
    assert len(lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def safetensors_bytes(header: dict[str, object], data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def corpus() -> dict[str, bytes]:
    good = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    return {
        "empty": b"",
        "truncated-length": b"\x10\x00\x00",
        "header-not-json": struct.pack("<Q", 9) + b"not json!",
        "length-past-the-end": struct.pack("<Q", 1 << 40) + b"{}",
        "data-missing": safetensors_bytes(good, b"\x00" * 4),
        "overlapping": safetensors_bytes(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\x00" * 12,
        ),
        "unknown-dtype": safetensors_bytes(
            {"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)
        ),
        "shape-size-mismatch": safetensors_bytes(
            {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)
        ),
    }


@pytest.mark.parametrize("case", sorted(corpus()))
def test_a_malformed_checkpoint_is_one_line_naming_the_file_and_nothing_is_published(
    mxo: Mxo, case: str, tmp_path: Path
) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(corpus()[case])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_weights(IDENTITY, weights)
    registry = f"sqlite://{tmp_path}/r.db"
    out = mxo("serve", "--model-id", IDENTITY.model_id, "--weights", str(weights), "--registry", registry)
    assert_one_line(out, 2, "model.safetensors")
    listed = mxo("sources", "--registry", registry, "--json")
    assert json.loads(listed.stdout) == []  # nothing was published


@pytest.mark.parametrize(
    "index",
    ["{not json", '{"weight_map": 3}', '{"weight_map": {"w": 7}}', '{"weight_map": {"w": "../outside.safetensors"}}',
     '{"weight_map": {"w": "missing.safetensors"}}', '["a list"]', '{"weight_map": {}}'],
)  # fmt: skip
def test_a_broken_index_is_one_line_naming_it(mxo: Mxo, index: str, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=r"index\.json"):
        load_weights(IDENTITY, weights)
    out = mxo(
        "serve",
        "--model-id",
        IDENTITY.model_id,
        "--weights",
        str(weights),
        "--registry",
        f"sqlite://{tmp_path}/r.db",
    )
    assert_one_line(out, 2, "index.json")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.binary(max_size=200),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
)
def test_any_bad_header_is_a_checkpoint_error_never_another_exception(
    tmp_path: Path, junk: bytes, header: dict[str, object]
) -> None:
    for name, data in (("a.safetensors", junk), ("b.safetensors", safetensors_bytes({"t": header}, junk))):
        directory = tmp_path / name.replace(".", "-")
        directory.mkdir(exist_ok=True)
        for old in directory.iterdir():
            old.unlink()
        (directory / name).write_bytes(data)
        try:
            load_weights(IDENTITY, directory)
        except CheckpointError as exc:
            assert name in str(exc)
        except ConfigError as exc:  # e.g. a file that holds no tensors at all
            assert "no tensors" in str(exc)


@pytest.mark.parametrize(
    "flag,value,needle",
    [("--attempt-timeout", "0", "attempt_timeout"), ("--attempt-timeout", "-1", "attempt_timeout"),
     ("--attempt-timeout", "nan", "attempt_timeout"), ("--timeout", "nan", "load_timeout"),
     ("--timeout", "inf", "load_timeout"), ("--timeout", "soon", "not a number")],
)  # fmt: skip
def test_bad_numbers_on_pull_are_usage_errors(
    mxo: Mxo, flag: str, value: str, needle: str, tmp_path: Path
) -> None:
    out = mxo("pull", "--model-id", "a/b", "--registry", f"sqlite://{tmp_path}/r.db", flag, value)
    assert out.returncode == 2 and "Traceback" not in out.stderr and needle in out.stderr
    assert out.stderr.count("\n") == 1


@pytest.mark.parametrize("value", ["0", "-1", "nan", "0.5"])
def test_bad_ttls_on_serve_are_usage_errors(mxo: Mxo, value: str, tmp_path: Path) -> None:
    out = mxo("serve", "--model-id", "a/b", "--weights", str(tmp_path), "--ttl", value)
    assert out.returncode == 2 and "ttl" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("value", ["1e9", "nan", "1", "-5", "86401"])
def test_a_bad_max_lease_on_serve_is_a_usage_error_before_the_weights_are_read(
    mxo: Mxo, value: str, tmp_path: Path
) -> None:
    out = mxo("serve", "--model-id", "a/b", "--weights", str(tmp_path), "--max-lease", value)
    assert_one_line(out, 2, "max_lease")


@pytest.mark.parametrize(
    "kwargs",
    [{"attempt_timeout": 0}, {"attempt_timeout": float("nan")}, {"load_timeout": -5}, {"probe_timeout": float("inf")},
     {"rank_window": -1}, {"probe_concurrency": 0}, {"attempt_timeout": True}],
)  # fmt: skip
def test_the_api_validates_the_same_numbers(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Orchestrator(None, [FakeStrategy("hub", {None: [succeed()]}, uses_peers=False)], **kwargs)  # type: ignore[arg-type]


def test_an_unwritable_out_fails_before_any_attempt(mxo: Mxo, tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    for out_dir, needle in ((blocked, "not a directory"), (blocked / "below", "not a writable directory")):
        out = mxo(
            "pull",
            "--model-id",
            "a/b",
            "--registry",
            f"sqlite://{tmp_path}/r.db",
            "--out",
            str(out_dir),
            "--json",
        )
        assert_one_line(out, 2, "--out", needle)
        assert out.stdout == ""  # no load started, so no report
    import os

    if os.geteuid() != 0:  # root writes anywhere: the mode means nothing to it
        out = mxo(
            "pull",
            "--model-id",
            "a/b",
            "--registry",
            f"sqlite://{tmp_path}/r.db",
            "--out",
            str(read_only / "x"),
        )
        assert_one_line(out, 2, "--out")


@pytest.mark.nixl
def test_a_pull_that_times_out_by_its_own_short_deadline_leaves_the_healthy_source_ready(
    mxo: Mxo, peers: Peers, registry_url: str
) -> None:
    """The shortest attempt deadline the CLI accepts, against a healthy source that is merely slow to answer
    (paused for the length of the pull): the target's own deadline strikes, which is no fault of the source.

    (Waiting for the process's own agent used to be the slow part; when the agent is ready in time the
    load simply succeeds, so the source is paused to make the deadline strike on every machine.)"""
    import signal

    (source,) = peers.start(("healthy", "arena"))
    source.signal(signal.SIGSTOP)
    try:
        out = mxo(
            "pull", "--model-id", MODEL_ID, "--registry", registry_url, "--attempt-timeout", "0.1", "--json"
        )
    finally:
        source.signal(signal.SIGCONT)
    report = json.loads(out.stdout)
    timed_out = [a for a in report["attempts"] if a["outcome"] == "TimedOut"]
    assert timed_out, report["attempts"]  # the deadline did strike
    assert not any(a["marked_stale"] for a in report["attempts"])
    (row,) = json.loads(mxo("sources", "--registry", registry_url, "--json").stdout)
    assert row["effective_state"] == "READY" and row["times_ejected"] == 0


def _readers(mxo: Mxo, registry_url: str) -> int:
    rows = json.loads(mxo("sources", "--registry", registry_url, "--json").stdout)
    return sum(r["load"] for r in rows)


def _wait_for(predicate: object, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


@pytest.mark.nixl
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGKILL"])
def test_a_pull_ended_mid_transfer_gives_its_reader_lease_back_within_the_lease(
    mxo: Mxo, peers: Peers, registry_url: str, signum: str
) -> None:
    import os
    import signal

    # a TTL that outlasts the test: the frozen source cannot heartbeat, its record must stay listed
    (source,) = peers.start(("frozen", "arena"), ttl=60.0)
    source.signal(signal.SIGSTOP)  # the READ is posted and never completes: the pull is mid-transfer
    pull = subprocess.Popen(
        [sys.executable, "-m", "mx_orchestrator", "pull", "--model-id", MODEL_ID, "--registry", registry_url,
         "--attempt-timeout", "60", "--reader-lease", "1", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert _wait_for(lambda: _readers(mxo, registry_url) == 1, 30), "the pull never became a reader"
        pull.send_signal(getattr(signal, signum))
        code = pull.wait(timeout=30)
        if signum == "SIGTERM":
            assert code == 128 + signal.SIGTERM and "interrupted by SIGTERM" in (
                pull.stderr.read() if pull.stderr else ""
            )
            assert _readers(mxo, registry_url) == 0  # given back on the way out
        else:
            assert _wait_for(lambda: _readers(mxo, registry_url) == 0, 3), (
                "the killed pull's lease did not run out"
            )
    finally:
        if pull.poll() is None:
            os.kill(pull.pid, signal.SIGKILL)
        pull.wait()
        source.signal(signal.SIGCONT)


@settings(max_examples=100, deadline=None)
@given(
    field=st.sampled_from(
        ["attempt_timeout", "load_timeout", "probe_timeout", "rank_window", "reader_lease"]
    ),
    value=st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(10**6), 10**6)
    | st.booleans()
    | st.text(max_size=3),
)
def test_any_number_given_to_the_api_is_accepted_or_a_config_error(field: str, value: object) -> None:
    from mx_orchestrator.config import FLOORS

    strategy = FakeStrategy("hub", {None: [succeed()]}, uses_peers=False)
    try:
        orchestrator = Orchestrator(None, [strategy], **{field: value})  # type: ignore[arg-type]
    except ConfigError as exc:
        assert field in str(exc)
        return
    floor, _ = FLOORS[field]
    assert isinstance(value, (int, float)) and not isinstance(value, bool)
    assert value >= floor and value < float("inf")
    assert orchestrator is not None


@pytest.mark.hub
async def test_a_broken_index_on_the_hub_is_a_typed_source_failure(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    from mx_orchestrator.target import Target
    from mx_orchestrator.testing.hub import HubServer
    from strategies.hf_download import HfDownload

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    (repo / "model-00001.safetensors").write_bytes(
        safetensors_bytes({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"x")
    )
    with HubServer({"acme/broken": repo}) as hub, capture_logs() as events:
        report = await Orchestrator(
            None, [HfDownload("acme/broken", endpoint=hub.endpoint, cache_dir=tmp_path / "c")]
        ).load(IDENTITY, Target("arena"))
    (attempt,) = report.attempts
    assert attempt.outcome.name == "SourceFailed" and "index.json" in attempt.outcome.detail
    assert not any(e["event"] == "attempt.strategy_raised" for e in events)  # typed, not a crash


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--source-id", "", "--weights", "."],
        ["serve", "--source-id", "two words", "--weights", "."],
        ["pull", "--republish", "--source-id", "a\x1bb", "--model-id", "acme/none"],
        ["pull", "--republish", "--source-id", "x" * 600, "--model-id", "acme/none"],
    ],
)
def test_a_bad_source_id_is_refused_before_any_work(mxo: Mxo, args: list[str]) -> None:
    """Empty, spaced, control-character or oversized ids: one line, exit 2, before any load."""
    import time

    began = time.monotonic()
    out = mxo(*args, timeout=60)
    assert_one_line(out, 2, "source id")
    assert time.monotonic() - began < 30  # no load was attempted (a pull would wait for sources)


def test_two_live_processes_given_one_source_id_do_not_flip_the_record(
    peers: Peers, registry_url: str
) -> None:
    """The second ``mxo serve --source-id dup`` takes the id over; the first notices at its next
    heartbeat, says so on one line and stops serving, instead of re-publishing every heartbeat."""
    import time

    from mx_orchestrator.registry import open_registry

    (first,) = peers.start(("dup", "arena"), ttl=1.5)
    (second,) = peers.start(("dup", "arena"), ttl=1.5)
    assert first.proc.wait(timeout=30) != 0
    err = first.proc.stderr.read().decode(errors="replace") if first.proc.stderr else ""
    assert "taken over by another live process" in err and "Traceback" not in err

    async def generation() -> str:
        registry = open_registry(registry_url)
        try:
            record = await registry.get("dup")
            assert record is not None
            return record.generation
        finally:
            await registry.aclose()

    seen = {anyio.run(generation)}
    time.sleep(2.0)  # a few heartbeats later the record is still the second's
    seen.add(anyio.run(generation))
    assert seen == {second.generation}
    assert second.proc.poll() is None


@pytest.mark.parametrize("where", ["dangling-link", "proc"])
def test_an_out_that_cannot_be_written_is_refused_before_the_pull(
    mxo: Mxo, tmp_path: Path, where: str
) -> None:
    """A dangling symlink or a path under /proc: one line, exit 2, and no load was started."""
    if where == "dangling-link":
        out = tmp_path / "out"
        out.symlink_to(tmp_path / "nowhere" / "at-all")
    else:
        out = Path("/proc/mxo-out-test")
    result = mxo(
        "pull", "--model-id", "acme/none", "--registry", f"sqlite://{tmp_path}/r.db", "--out", str(out), "--json",
        timeout=60,
    )  # fmt: skip
    assert_one_line(result, 2, "--out")
    assert result.stdout == ""  # refused before any report: nothing was loaded


def test_a_fifo_named_like_a_checkpoint_is_refused_not_read(mxo: Mxo, tmp_path: Path) -> None:
    """``fingerprint`` and ``serve`` read regular files only: a FIFO would block them forever."""
    import os

    os.mkfifo(tmp_path / "model.safetensors")
    for args in (
        ["fingerprint", "--weights", str(tmp_path)],
        [
            "serve",
            "--model-id",
            "acme/fifo",
            "--weights",
            str(tmp_path),
            "--registry",
            f"sqlite://{tmp_path}/r.db",
        ],
    ):
        assert_one_line(mxo(*args, timeout=60), 2, "not a regular file")


def test_a_checkpoint_with_no_tensors_has_no_pin(mxo: Mxo, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes({}))
    assert_one_line(mxo("fingerprint", "--weights", str(tmp_path), timeout=60), 2, "no tensors")


def test_every_command_takes_debug_and_a_foreign_device_is_named_as_such(mxo: Mxo, tmp_path: Path) -> None:
    from mx_orchestrator.testing.peers import minilm_dir

    assert mxo("fingerprint", "--weights", str(minilm_dir()), "--debug", timeout=120).returncode == 0
    demo = mxo("demo", "--debug", "--scenario", "no-such-scenario", timeout=60)
    assert demo.returncode == 2 and "--debug" not in demo.stderr and "scenario" in demo.stderr
    for command in (["pull", "--model-id", "acme/none"], ["serve", "--weights", str(tmp_path)]):
        out = mxo(*command, "--device", "tpu", timeout=60)
        assert out.returncode == 2 and "other accelerators are not supported" in out.stderr
        assert "CUDA is not available" not in out.stderr


@pytest.mark.parametrize(
    ("value", "needle"),
    [("0", "max_rate"), ("-1", "max_rate"), ("nan", "max_rate"), ("inf", "max_rate"), ("fast", "max-rate")],
)
def test_a_nonsensical_rate_cap_is_refused_before_any_work(mxo: Mxo, value: str, needle: str) -> None:
    """``pull --max-rate`` (GB/s) must be a positive finite number: one line, exit 2, nothing loaded."""
    out = mxo("pull", "--model-id", "acme/none", "--max-rate", value, timeout=60)
    assert_one_line(out, 2, needle)


def test_a_rate_cap_is_refused_by_the_api_as_by_the_cli() -> None:
    from mx_orchestrator import Orchestrator
    from mx_orchestrator.errors import ConfigError
    from mx_orchestrator.testing import FakeStrategy, succeed

    for bad in (0, -5.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ConfigError, match="max_rate"):
            Orchestrator(None, [FakeStrategy("s", default=succeed(), uses_peers=False)], max_rate=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_part_bytes"):
        Orchestrator(None, [FakeStrategy("s", default=succeed(), uses_peers=False)], max_part_bytes=0)
