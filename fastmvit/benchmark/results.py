"""What a benchmark run records: per-call statistics, one result per (variant, batch, dtype, engine),
the results file (JSON, ``SCHEMA``) and the machine, versions, date and git commit it came from."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..cpu.runtimes import cpu_count, cpu_name
from ..errors import OptionError

SCHEMA = "fastmvit-bench/1"


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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)  # atomic: a run killed by a time limit never leaves half a file
        return path

    @classmethod
    def merge(cls, runs: List["Run"]) -> "Run":
        """One run from several of the same device (e.g. a quick sweep and a torch.compile sweep): results,
        roofline rows and kernels together, a later file's entry replacing an earlier one's at the same
        point. Runs from different devices are refused: their numbers must not share a table."""
        devices = {r.meta.get("device") for r in runs}
        if len(devices) > 1:
            raise OptionError(f"results from different devices cannot be merged: {sorted(map(str, devices))}")
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

        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise OptionError(f"no such results file: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise OptionError(f"{path}: not a fastmvit results file (not readable JSON: {e})") from None
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            d = d if isinstance(d, dict) else {}
            raise OptionError(f"{path}: not a fastmvit results file (schema {d.get('schema')!r}, want {SCHEMA!r})")
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


def load_average() -> Optional[list]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def finish(meta: dict) -> dict:
    """Stamp the end of a run on its ``meta``: the load average then, and whether the machine was busy."""
    meta["load_average_end"] = load_average()
    meta["busy"] = busy_reasons(meta)
    return meta


# Other work on the machine: busy when, beside this run, more runnable threads than half the CPUs (at least
# one) waited on average over the last minute, or when repeated peak measurements varied by more than half.
BUSY_LOAD_PER_CPU = 0.5
BUSY_PEAK_SPREAD = 1.5


def busy_reasons(meta: dict) -> List[str]:
    """Why the numbers of a run are doubtful because other work competed with it; [] when it ran on a quiet
    machine. Reads the load averages ``environment`` and ``finish`` recorded and the spread of the
    repeated peak measurements (``peaks.measure``)."""
    reasons = []
    cpus = meta.get("cpus") or cpu_count()
    limit = max(1.0, BUSY_LOAD_PER_CPU * cpus)
    start, end = meta.get("load_average"), meta.get("load_average_end")
    # At the end the 1-minute average includes this run's own threads (one on a GPU: the host thread).
    own = min(meta.get("threads") or 1, cpus) if meta.get("device_type") == "cpu" else 1
    if start and start[0] >= limit:
        reasons.append(f"load average {start[0]:.1f} on {cpus} CPUs when the run started")
    if end and end[0] - own >= limit:
        reasons.append(f"load average {end[0]:.1f} on {cpus} CPUs at the end, of which this run's own "
                       f"threads account for about {own}")
    spreads = {k: v for k, v in ((meta.get("peak") or {}).get("spread") or {}).items() if v and v > BUSY_PEAK_SPREAD}
    if spreads:
        worst = max(spreads, key=spreads.get)
        reasons.append(f"the repeated peak measurements varied up to {spreads[worst]:.1f}x ({worst})")
    return reasons


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
        "cpus": cpu_count(),
        # Other work on the machine makes CPU timings noisy: record how busy it was (1, 5, 15 minutes),
        # here and, via ``finish``, at the end of the run.
        "load_average": load_average(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        meta["gpu"] = {"name": p.name, "sm": f"{p.major}{p.minor}", "memory_GiB": round(p.total_memory / 2**30, 1),
                       "multiprocessors": p.multi_processor_count}
    return meta
