"""Benchmark: raw huggingface_hub + safetensors against the hf_download strategy (with sha256).

Both download all-MiniLM-L6-v2 from the same loopback Hub server into a fresh
cache each repetition and load the tensors; the strategy also verifies every
LFS file's sha256 and copies into pre-faulted target buffers. Prints one JSON
object with medians and the ratio raw / ours (target >= 0.90).

    python bench/hf.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import anyio  # noqa: E402

from mx_orchestrator import ModelIdentity, Orchestrator  # noqa: E402
from mx_orchestrator.logs import configure_logging  # noqa: E402
from mx_orchestrator.target import Target  # noqa: E402
from mx_orchestrator.testing.hub import HubServer  # noqa: E402
from mx_orchestrator.testing.peers import MODEL_ID, minilm_dir  # noqa: E402
from strategies.hf_download import DEFAULT_PATTERNS, HfDownload  # noqa: E402


def raw_seconds(endpoint: str, cache: Path) -> float:
    from huggingface_hub import snapshot_download
    from safetensors.torch import load_file

    began = time.perf_counter()
    path = snapshot_download(
        MODEL_ID, endpoint=endpoint, cache_dir=cache, allow_patterns=list(DEFAULT_PATTERNS)
    )
    tensors = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    assert tensors
    return time.perf_counter() - began


def ours_seconds(endpoint: str, cache: Path) -> tuple[float, bool]:
    target = Target("arena")
    identity = ModelIdentity(MODEL_ID)

    async def run() -> tuple[float, bool]:
        strategy = HfDownload(MODEL_ID, endpoint=endpoint, cache_dir=cache)
        began = time.perf_counter()
        report = await Orchestrator(None, [strategy]).load(identity, target)
        seconds = time.perf_counter() - began
        assert report.loaded, report.to_json()
        return seconds, bool(report.final and report.final.verified)

    return anyio.run(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    configure_logging("warning")
    raw, ours, verified = [], [], True
    with HubServer({MODEL_ID: minilm_dir()}) as hub, tempfile.TemporaryDirectory() as tmp:
        raw_seconds(hub.endpoint, Path(tmp) / "warm-raw")  # imports and first connections out of the timings
        ours_seconds(hub.endpoint, Path(tmp) / "warm-ours")
        for i in range(args.repeat):  # interleaved, fresh caches: both pay the same download
            raw.append(raw_seconds(hub.endpoint, Path(tmp) / f"raw-{i}"))
            seconds, ok = ours_seconds(hub.endpoint, Path(tmp) / f"ours-{i}")
            ours.append(seconds)
            verified &= ok
        cached, _ = ours_seconds(hub.endpoint, Path(tmp) / f"ours-{args.repeat - 1}")
    nbytes = (minilm_dir() / "model.safetensors").stat().st_size
    raw_s, ours_s = statistics.median(raw), statistics.median(ours)
    print(
        json.dumps(
            {
                "benchmark": "hf",
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}",
                "files": "all-MiniLM-L6-v2 (model.safetensors 90.9 MB + config/tokenizer)",
                "repeat": args.repeat,
                "raw_snapshot_download_and_load_s": round(raw_s, 4),
                "hf_download_strategy_s": round(ours_s, 4),
                "hf_download_verified": verified,
                "raw_gbps": round(nbytes / raw_s / 1e9, 3),
                "ours_gbps": round(nbytes / ours_s / 1e9, 3),
                "ratio_raw_over_ours": round(raw_s / ours_s, 3),
                "target_ratio": 0.90,
                "cached_reload_s": round(cached, 4),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
