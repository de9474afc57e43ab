"""The one timing harness every fastmvit benchmark uses (the CLI, ``pytest bench/`` and the kernel
microbenchmarks): warm-up outside the timed region, the device synchronised inside every timed call,
median and spread, and the machine, versions, date and git commit with every result.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

SCHEMA = "fastmvit-bench/1"


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, where every op is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call, the device's work included.

    On CUDA: events recorded on the current stream around the call, then a synchronise; the start event
    is timestamped when the host reaches it, so launch overhead on an idle GPU counts, as it does for a
    caller. On the CPU: ``perf_counter`` around the call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a device synchronise: what pytest-benchmark's wall clock must time."""
    def call():
        fn()
        synchronize(device)
    return call


@dataclass
class Stats:
    """Summary of per-call times in milliseconds."""

    median: float
    q1: float
    q3: float
    min: float
    mean: float
    std: float
    rounds: int

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> "Stats":
        if not samples:
            raise ValueError("no timing samples")
        ms = sorted(s * 1e3 for s in samples)
        if len(ms) >= 2:
            q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        else:
            q1 = q3 = ms[0]
        return cls(median=statistics.median(ms), q1=q1, q3=q3, min=ms[0], mean=statistics.fmean(ms),
                   std=statistics.pstdev(ms) if len(ms) > 1 else 0.0, rounds=len(ms))


@dataclass
class Budget:
    """How long to measure: at least ``min_rounds`` timed calls, more until ``seconds`` have been spent
    (all engines of one interleaved group together), never more than ``max_rounds``; ``warmup`` untimed
    calls first (engines that compile or capture ask for more)."""

    warmup: int = 2
    min_rounds: int = 5
    max_rounds: int = 200
    seconds: float = 2.0

    def rounds_for(self, seconds_per_round: float) -> int:
        if seconds_per_round <= 0:
            return self.max_rounds
        return int(min(self.max_rounds, max(self.min_rounds, self.seconds / seconds_per_round)))


def warm_up(fn: Callable[[], object], device: torch.device, calls: int) -> List[float]:
    """Untimed calls (they trigger compilation, autotuning and graph capture); returns each call's
    seconds so the first call's compile time can be reported."""
    times = []
    for _ in range(max(1, calls)):
        times.append(time_call(fn, device))
    return times


def measure_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, budget: Budget,
                        warmups: Optional[Dict[str, int]] = None) -> Dict[str, tuple]:
    """Time several callables round-robin (one call of each per round), so drift in clocks, temperature
    or other load on the machine hits every engine alike. Returns name -> (Stats, warm-up seconds).
    A callable that raises is reported as name -> (exception, warm-up seconds)."""
    warmups = warmups or {}
    out: Dict[str, tuple] = {}
    live: Dict[str, Callable[[], object]] = {}
    per_call: Dict[str, float] = {}
    for name, fn in fns.items():
        try:
            w = warm_up(fn, device, max(budget.warmup, warmups.get(name, 0)))
            per_call[name] = time_call(fn, device)  # one settled call sizes the round count
            live[name] = fn
            out[name] = (None, sum(w))
        except Exception as e:  # an engine that breaks is reported, never ends the run
            out[name] = (e, 0.0)
    rounds = budget.rounds_for(sum(per_call.values()))
    samples: Dict[str, List[float]] = {name: [per_call[name]] for name in live}
    for _ in range(rounds - 1):
        for name, fn in list(live.items()):
            try:
                samples[name].append(time_call(fn, device))
            except Exception as e:
                out[name] = (e, out[name][1])
                del live[name]
    for name in live:
        out[name] = (Stats.from_seconds(samples[name]), out[name][1])
    return out


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------

@dataclass
class Result:
    """One (variant, batch, dtype, engine) measurement, or why there is none."""

    variant: str
    batch: int
    dtype: str
    engine: str
    status: str                      # "ok", "unavailable" (library or feature missing), "failed"
    reason: str = ""
    ms: Optional[Stats] = None       # per batch
    images_per_s: Optional[float] = None
    warmup_s: Optional[float] = None  # all warm-up calls: compile / capture time for those engines
    max_abs_diff: Optional[float] = None  # logits against fastmvit's float32 torch path, same weights
    size: int = 256

    def __post_init__(self):
        if self.ms is not None and self.images_per_s is None:
            self.images_per_s = self.batch / (self.ms.median / 1e3)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ms"] = asdict(self.ms) if self.ms is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Result":
        d = dict(d)
        if d.get("ms") is not None:
            d["ms"] = Stats(**d["ms"])
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Run:
    """A results file: ``meta`` (machine, versions, date, commit, peaks), model ``results``, the
    ``roofline`` rows and the kernel microbenchmarks."""

    meta: dict
    results: List[Result] = field(default_factory=list)
    roofline: List[dict] = field(default_factory=list)
    kernels: List[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "meta": self.meta, "results": [r.to_dict() for r in self.results],
                "roofline": self.roofline, "kernels": self.kernels}

    def save(self, path) -> Path:
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def merge(cls, runs: List["Run"]) -> "Run":
        """One run from several of the same device (e.g. a quick sweep and a torch.compile sweep): results,
        roofline rows and kernels together, a later file's entry replacing an earlier one's at the same
        point. Runs from different devices are refused: their numbers must not share a table."""
        devices = {r.meta.get("device") for r in runs}
        if len(devices) > 1:
            raise ValueError(f"results from different devices cannot be merged: {sorted(map(str, devices))}")
        meta = dict(runs[0].meta)
        if len(runs) > 1:
            meta["merged_from"] = [{"date": r.meta.get("date"), "command": r.meta.get("command")} for r in runs]
        results: Dict[tuple, Result] = {}
        roof: Dict[tuple, dict] = {}
        kern: Dict[tuple, dict] = {}
        for r in runs:
            for x in r.results:
                results[(x.variant, x.batch, x.dtype, x.size, x.engine)] = x
            for x in r.roofline:
                roof[(x["variant"], x["batch"], x["dtype"], x.get("size", 256))] = x
            for x in r.kernels:
                kern[(x["family"], x["case"], x["dtype"])] = x
        return cls(meta, list(results.values()), list(roof.values()), list(kern.values()))

    @classmethod
    def load(cls, path) -> "Run":
        import json

        d = json.loads(Path(path).read_text())
        if d.get("schema") != SCHEMA:
            raise ValueError(f"{path}: not a fastmvit results file (schema {d.get('schema')!r}, want {SCHEMA!r})")
        return cls(d["meta"], [Result.from_dict(r) for r in d["results"]], d.get("roofline", []),
                   d.get("kernels", []))


# --------------------------------------------------------------------------------------------------
# Where and with what the numbers were taken
# --------------------------------------------------------------------------------------------------

def _version(dist: str) -> Optional[str]:
    """An installed distribution's version, read from its metadata (importing transformers takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """The commit of the fastmvit source tree (``FASTMVIT_GIT_COMMIT`` overrides, for copies without
    .git), with "+dirty" when tracked files differ from it."""
    if os.environ.get("FASTMVIT_GIT_COMMIT"):
        return os.environ["FASTMVIT_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line() -> str:
    """How this process was started, ``python -m fastmvit bench ...`` rather than a path to __main__.py."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py":
        argv[0] = f"python -m {Path(argv[0]).parent.name}"
    return " ".join(argv)


def environment(device: torch.device) -> dict:
    """Machine, versions, date and commit, recorded with every results file."""
    from .. import __version__

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "git_commit": git_commit(),
        "command": command_line(),
        "versions": {
            "fastmvit": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "triton": _version("triton"),
            "timm": _version("timm"),
            "transformers": _version("transformers"),
            "numpy": _version("numpy"),
        },
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        # Other work on the machine makes CPU timings noisy: record how busy it was.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        meta["gpu"] = {"name": p.name, "sm": f"{p.major}{p.minor}", "memory_GiB": round(p.total_memory / 2**30, 1),
                       "multiprocessors": p.multi_processor_count}
    return meta


# --------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------

def progress(items: Iterable, total: int, desc: str, enabled: bool = True):
    """tqdm when it is importable and the sweep is long; plain lines on stderr otherwise."""
    items = list(items)
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and sys.stderr.isatty():
        with tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False) as bar:
            for item in bar:
                bar.set_postfix_str(str(item))
                yield item
        return
    for i, item in enumerate(items, 1):
        print(f"[{i}/{total}] {desc}: {item}", file=sys.stderr, flush=True)
        yield item
