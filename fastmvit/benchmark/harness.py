"""The one timing harness every fastmvit benchmark uses (the CLI, ``pytest bench/`` and the model
benchmarks; the kernel microbenchmarks use ``triton.testing.do_bench``): warm-up outside the timed
region, the device synchronised inside every timed call, median and spread (``results.Stats``).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .results import Stats


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
    or other load on the machine hits every engine alike. Round r starts at the r-th engine, so each runs
    after every other equally often: whatever one leaves behind (torch's OpenMP workers spin-waiting after
    a call, a cold cache) does not always land on the same neighbour (measured before the rotation, on a
    2-core CPU: the row after torch eager 1.8 ms slower at batch 1 than the same runtime one row later).
    Returns name -> (Stats, warm-up seconds). A callable that raises is reported as name -> (exception,
    warm-up seconds)."""
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
    for r in range(1, rounds):
        order = list(live.items())
        for name, fn in order[r % len(order):] + order[:r % len(order)]:
            try:
                samples[name].append(time_call(fn, device))
            except Exception as e:
                out[name] = (e, out[name][1])
                del live[name]
    for name in live:
        out[name] = (Stats.from_seconds(samples[name]), out[name][1])
    return out


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
    label = lambda item: " ".join(map(str, item)) if isinstance(item, tuple) else str(item)  # noqa: E731
    if tqdm is not None and sys.stderr.isatty():
        with tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False) as bar:
            for item in bar:
                bar.set_postfix_str(label(item))
                yield item
        return
    for i, item in enumerate(items, 1):
        print(f"[{i}/{total}] {desc}: {label(item)}", file=sys.stderr, flush=True)
        yield item
