"""Load test of fastmvit's serving plug-ins: throughput, latency percentiles and the batch-size histogram.

Starts the server itself on 127.0.0.1 (its own process group, a free port, a readiness poll, a kill at the
end), or loads one already running on this machine (--url, loopback only). Every request is one encoded
image; each concurrency level sends --requests of them from that many concurrent clients.

    python bench/serving_load.py litserve --model s --requests 3000 --concurrency 16 32 64
    python bench/serving_load.py triton --protocol grpc --model s --requests 3000 --concurrency 16 32 64
    python bench/serving_load.py litserve --model xxs --random --input-size 128 --requests 200   # CPU smoke

The batch sizes come from the server itself: LitServe's fastmvit_batch_size histogram on /metrics, Triton's
per-batch-size execution counts (statistics extension). --json writes the results with the machine,
versions and date.

Soak under faults (LitServe): --soak sends --requests requests from --concurrency[0] clients, a
--bad-fraction of them bad (garbage, truncated JPEG, empty body, decompression bomb), SIGKILLs the model
worker once --kill-at of them have been sent, and reports good requests answered, bad ones refused (4xx),
and failures by status (503 with Retry-After while the worker is replaced is expected; a connection error
or a bad request answered 200 is not), the recovery time (kill to the next 200 / to /health 200), and
the resident memory of the server's processes at each quarter of the run:

    python bench/serving_load.py litserve --soak --model xxs --random --input-size 128 --requests 10000 \
        --concurrency 32 --bad-fraction 0.05 --kill-at 0.5
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import platform
import signal
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import urlparse

import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def sample_images(paths: List[str], count: int = 8) -> List[bytes]:
    """The user's images, or ``count`` synthetic JPEGs of camera-like size (640x480, different content)."""
    if paths:
        return [Path(p).read_bytes() for p in paths]
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    out = []
    for i in range(count):
        base = np.stack([(xx * (i + 1)) % 256, (yy * (i + 2)) % 256, (xx + yy * i) % 256], -1)
        noise = rng.integers(0, 40, base.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def bad_bodies(good: bytes) -> Dict[str, bytes]:
    """Bad requests of the kinds a public endpoint sees; each must get its own 4xx."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return {"garbage": os.urandom(2000), "truncated": good[: len(good) // 3], "empty": b"", "bomb": bomb}


# -------------------------------------------------------------------------------------------------
# Servers

def start_litserve(args, log_dir: Path):
    from fastmvit.serving.launch import ServerProcess, free_port

    port = free_port()
    cmd = [sys.executable, "-m", "fastmvit", "serve", "--model", args.model, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch-size", str(args.max_batch_size),
           "--batch-timeout-ms", str(args.batch_timeout_ms), "--device", args.device, "--log-level", "warning"]
    cmd += ["--weights", args.weights] if args.weights else ["--random"] if args.random else []
    cmd += ["--input-size", str(args.input_size)] if args.input_size else []
    env = dict(os.environ)
    if args.cpu_threads:
        env["OMP_NUM_THREADS"] = str(args.cpu_threads)
    proc = ServerProcess(cmd, env=env, log_path=str(log_dir / "litserve.log"), name="litserve").start()
    proc.wait_ready(f"http://127.0.0.1:{port}/health", timeout=args.startup_timeout)
    return proc, f"http://127.0.0.1:{port}"


def start_triton(args, log_dir: Path):
    from fastmvit.serving.launch import ServerProcess, default_install_dir, find_tritonserver, free_port
    from fastmvit.serving.triton import write_model_repository

    install = find_tritonserver()
    if install is None:
        raise SystemExit(f"no tritonserver at {default_install_dir()}: run `bash .ci/setup_serving.sh`, "
                         f"or pass --url of a running server")
    write_model_repository(log_dir / "repo", args.model, args.weights, pretrained=not args.random,
                           kind="gpu" if args.device in ("cuda", "gpu") else "cpu" if args.device == "cpu" else "auto",
                           max_batch_size=args.max_batch_size, input_size=args.input_size,
                           max_queue_delay_us=int(args.batch_timeout_ms * 1000))
    ports = [free_port() for _ in range(3)]
    proc = ServerProcess(install.command(str(log_dir / "repo"), *ports), env=install.env(),
                         log_path=str(log_dir / "tritonserver.log"), name="tritonserver").start()
    proc.wait_ready(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=args.startup_timeout)
    return proc, f"http://127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"


# -------------------------------------------------------------------------------------------------
# Clients: each returns an async function sending one image, raising on anything but success

def litserve_sender(url: str):
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=120))

    async def send(data: bytes):
        async with session.post(f"{url}/predict", data=data, headers={"Content-Type": "image/jpeg"}) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"{r.status}: {body[:200]!r}")

    return send, session.close


def triton_sender(protocol: str, http_url: str, grpc_url: str, name: str):
    if protocol == "grpc":
        import tritonclient.grpc.aio as client_mod
        client = client_mod.InferenceServerClient(grpc_url)
    else:
        import tritonclient.http.aio as client_mod
        client = client_mod.InferenceServerClient(urlparse(http_url).netloc, conn_limit=1024)
    outputs = [client_mod.InferRequestedOutput("topk_indices"), client_mod.InferRequestedOutput("topk_scores")]

    async def send(data: bytes):
        arr = np.array([[data]], dtype=np.object_)
        inp = client_mod.InferInput("image_bytes", [1, 1], "BYTES")
        inp.set_data_from_numpy(arr)
        await client.infer(name, [inp], outputs=outputs)

    return send, client.close


# -------------------------------------------------------------------------------------------------
# Batch sizes, read from the server

def batch_counts(args, http_url: str) -> Dict[int, int]:
    """Batches run so far, by size (cumulative since the server started)."""
    import urllib.request

    if args.server == "litserve":
        text = urllib.request.urlopen(f"{http_url}/metrics", timeout=30).read().decode()
        cumulative = {}
        for line in text.splitlines():
            if line.startswith("fastmvit_batch_size_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                if le != "+Inf":
                    cumulative[int(float(le))] = float(line.rsplit(" ", 1)[1])
        sizes, prev, out = sorted(cumulative), 0.0, {}
        for s in sizes:
            out[s], prev = int(cumulative[s] - prev), cumulative[s]
        return {s: n for s, n in out.items() if n}
    doc = json.loads(urllib.request.urlopen(f"{http_url}/v2/models/{args.name}/stats", timeout=30).read())
    stats = doc["model_stats"][0]["batch_stats"]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats}


# -------------------------------------------------------------------------------------------------

async def run_level(send, images: List[bytes], requests: int, concurrency: int, max_seconds: float) -> dict:
    latencies, errors, next_i = [], [], 0
    deadline = time.perf_counter() + max_seconds

    async def client():
        nonlocal next_i
        while next_i < requests and time.perf_counter() < deadline:
            i, next_i = next_i, next_i + 1
            t = time.perf_counter()
            try:
                await send(images[i % len(images)])
                latencies.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(str(e)[:200])

    start = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"concurrency": concurrency, "requests": len(latencies) + len(errors), "ok": len(latencies),
            "errors": len(errors), "first_errors": errors[:3], "seconds": wall,
            "throughput_rps": len(latencies) / wall if wall else 0.0,
            "latency_ms": {p: float(np.percentile(lat, q)) for p, q in
                           (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
            "latency_mean_ms": float(lat.mean())}


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the server's process group, in MB."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getpgid(int(d.name)) != pgid:
                continue
            total += int((d / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total / 2**20


def worker_pid(pgid: int) -> Optional[int]:
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and os.getpgid(int(d.name)) == pgid and b"spawn_main" in (d / "cmdline").read_bytes():
                return int(d.name)
        except OSError:
            continue
    return None


async def run_soak(url: str, proc, images: List[bytes], args) -> dict:
    """--soak: one long run with bad requests among the good and one worker kill (see the docstring)."""
    import aiohttp

    rng = np.random.default_rng(0)
    bad = bad_bodies(images[0])
    kinds = ["good" if rng.random() >= args.bad_fraction else str(rng.choice(sorted(bad)))
             for _ in range(args.requests)]
    counts = {"good": 0, "bad": 0, "answered": 0, "refused": 0, "failed": {}, "bad_answered_200": 0,
              "retry_after_missing": 0}
    memory, quarters, next_i = [], {args.requests * q // 4 for q in range(1, 5)}, 0
    kill_i = int(args.requests * args.kill_at) if args.kill_at is not None else None
    kill = {"at": None, "first_200_after": None, "health_200_after": None}
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120))

    async def watch_health():
        while kill["health_200_after"] is None:
            await asyncio.sleep(0.2)
            if kill["at"] is None:
                continue
            try:
                async with session.get(f"{url}/health") as r:
                    if r.status == 200 and time.monotonic() - kill["at"] > 0.5:
                        kill["health_200_after"] = time.monotonic() - kill["at"]
            except aiohttp.ClientError:
                pass

    async def client():
        nonlocal next_i
        while next_i < args.requests:
            i, next_i = next_i, next_i + 1
            if i == kill_i:
                pid = worker_pid(proc.proc.pid)
                os.kill(pid, signal.SIGKILL)
                kill["at"] = time.monotonic()
                print(f"    request {i}: SIGKILLed model worker pid {pid}", flush=True)
            kind = kinds[i]
            body = images[i % len(images)] if kind == "good" else bad[kind]
            sent = time.monotonic()
            try:
                async with session.post(f"{url}/predict", data=body, headers={"Content-Type": "image/jpeg"}) as r:
                    await r.read()
                    status, retry = r.status, r.headers.get("Retry-After")
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                status, retry = type(e).__name__, None
            if kind == "good":
                counts["good"] += 1
                if status == 200:
                    counts["answered"] += 1
                    if kill["at"] is not None and sent > kill["at"] and kill["first_200_after"] is None:
                        kill["first_200_after"] = time.monotonic() - kill["at"]
                else:
                    counts["failed"][str(status)] = counts["failed"].get(str(status), 0) + 1
                    if status in (429, 503) and retry is None:
                        counts["retry_after_missing"] += 1
                    if status in (429, 503):
                        await asyncio.sleep(min(float(retry or 1), 1.0))  # as a client should
            else:
                counts["bad"] += 1
                if isinstance(status, int) and 400 <= status < 500:
                    counts["refused"] += 1
                elif status == 200:
                    counts["bad_answered_200"] += 1
                else:
                    counts["failed"][f"bad:{status}"] = counts["failed"].get(f"bad:{status}", 0) + 1
            done = counts["good"] + counts["bad"]
            if done in quarters:
                quarters.discard(done)
                memory.append({"requests": done, "rss_mb": round(group_rss_mb(proc.proc.pid), 1)})
                print(f"    {done} requests: server RSS {memory[-1]['rss_mb']:.0f} MB", flush=True)

    start = time.monotonic()
    health = asyncio.ensure_future(watch_health())
    try:
        await asyncio.gather(*[client() for _ in range(args.concurrency[0])])
    finally:
        health.cancel()
        await session.close()
    wall = time.monotonic() - start
    result = {"requests": args.requests, "concurrency": args.concurrency[0], "bad_fraction": args.bad_fraction,
              "seconds": round(wall, 1), **counts, "memory": memory,
              "recovery_s": {k: (round(v, 2) if v is not None else None) for k, v in
                             (("first_200", kill["first_200_after"]), ("health_200", kill["health_200_after"]))}}
    print(f"soak: {counts['answered']}/{counts['good']} good answered, {counts['refused']}/{counts['bad']} bad refused, "
          f"failed {counts['failed']}, bad answered 200: {counts['bad_answered_200']}, 429/503 without Retry-After: "
          f"{counts['retry_after_missing']}; recovery after the kill: first 200 {result['recovery_s']['first_200']} s, "
          f"/health 200 {result['recovery_s']['health_200']} s; {wall:.0f} s in all", flush=True)
    return result


def environment() -> dict:
    import torch

    import fastmvit

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "fastmvit": fastmvit.__version__,
           "cpu": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for pkg in ("litserve", "tritonclient"):
        try:
            from importlib.metadata import version

            env[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            env[pkg] = None
    return env


def histogram_line(counts: Dict[int, int]) -> str:
    total = sum(counts.values()) or 1
    return "  ".join(f"{s}:{n} ({100 * n / total:.0f}%)" for s, n in sorted(counts.items()))


async def main_async(args) -> dict:
    images = sample_images(args.image)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fastmvit-load-") as tmp:
        proc = None
        if args.url:
            host = urlparse(args.url).hostname
            if host not in LOOPBACK:
                raise SystemExit(f"--url must be a server on this machine (127.0.0.1, localhost, ::1), not {host}")
            http_url, grpc_url = args.url.rstrip("/"), args.grpc_url
        elif args.server == "litserve":
            proc, http_url = start_litserve(args, Path(tmp))
            grpc_url = None
        else:
            proc, http_url, grpc_url = start_triton(args, Path(tmp))
        try:
            if args.soak:
                soak = await run_soak(http_url, proc, images, args)
                return {"server": args.server, "model": args.model, "input_size": args.input_size,
                        "max_batch_size": args.max_batch_size, "environment": environment(),
                        "load_before": load_before, "soak": soak, "results": []}
            if args.server == "litserve":
                send, close = litserve_sender(http_url)
            else:
                send, close = triton_sender(args.protocol, http_url, grpc_url, args.name)
            try:
                await run_level(send, images, min(args.warmup_requests, args.requests), 4, args.max_seconds)
                results = []
                for c in args.concurrency:
                    before = batch_counts(args, http_url)
                    r = await run_level(send, images, args.requests, c, args.max_seconds)
                    after = batch_counts(args, http_url)
                    r["batch_sizes"] = {s: n - before.get(s, 0) for s, n in after.items() if n - before.get(s, 0)}
                    batches = sum(r["batch_sizes"].values())
                    r["mean_batch_size"] = (sum(s * n for s, n in r["batch_sizes"].items()) / batches) if batches else 0
                    results.append(r)
                    lat = r["latency_ms"]
                    print(f"{args.server}/{args.protocol if args.server == 'triton' else 'http'} c={c:3d}: "
                          f"{r['ok']}/{r['requests']} ok in {r['seconds']:.1f} s, {r['throughput_rps']:.1f} req/s, "
                          f"latency ms p50 {lat['p50']:.1f} p90 {lat['p90']:.1f} p99 {lat['p99']:.1f} "
                          f"max {lat['max']:.1f}, mean batch {r['mean_batch_size']:.2f}", flush=True)
                    print(f"    batch sizes: {histogram_line(r['batch_sizes'])}", flush=True)
                    if r["errors"]:
                        print(f"    {r['errors']} errors, e.g. {r['first_errors']}", flush=True)
            finally:
                await close()
        finally:
            if proc is not None:
                proc.stop()
    return {"server": args.server, "protocol": args.protocol, "model": args.model, "input_size": args.input_size,
            "max_batch_size": args.max_batch_size, "batch_timeout_ms": args.batch_timeout_ms,
            "environment": environment(), "results": results}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("server", choices=("litserve", "triton"))
    p.add_argument("--protocol", choices=("http", "grpc"), default="http", help="Triton's protocol (default http)")
    p.add_argument("--model", default="s")
    p.add_argument("--weights")
    p.add_argument("--random", action="store_true", help="random weights (no download)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--input-size", type=int)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout-ms", type=float, default=2.0,
                   help="LitServe's batch timeout / Triton's max queue delay (default 2 ms)")
    p.add_argument("--requests", type=int, default=3000, help="requests per concurrency level (default 3000)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--warmup-requests", type=int, default=50)
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop a level after this long (default 600)")
    p.add_argument("--image", nargs="*", default=[], help="images to send (default: synthetic 640x480 JPEGs)")
    p.add_argument("--url", help="load this running server instead of starting one (loopback only)")
    p.add_argument("--grpc-url", help="with --url and --protocol grpc: host:port of its gRPC endpoint")
    p.add_argument("--name", default="fastmvit", help="Triton model name (default fastmvit)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--cpu-threads", type=int, help="OMP_NUM_THREADS of the server it starts (default: torch's)")
    p.add_argument("--soak", action="store_true", help="the soak under faults (LitServe; see the docstring)")
    p.add_argument("--bad-fraction", type=float, default=0.05, help="--soak: share of bad requests (default 0.05)")
    p.add_argument("--kill-at", type=float, default=0.5,
                   help="--soak: SIGKILL the model worker after this share of the requests (default 0.5)")
    args = p.parse_args(argv)
    if args.soak and (args.server != "litserve" or args.url):
        p.error("--soak starts a LitServe server itself (it kills its worker): use it without --url")
    if args.requests < 1 or min(args.concurrency) < 1:
        p.error("--requests and --concurrency must be positive")
    out = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.soak:
        soak = out["soak"]
        return 0 if set(soak["failed"]) <= {"503"} and not soak["bad_answered_200"] else 1
    return 0 if all(r["errors"] == 0 for r in out["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
