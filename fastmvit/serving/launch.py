"""Run serving processes on this machine: a free port, a process group of its own, a readiness poll and a
kill on stop; and the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel bundles, run without
Docker and without PyTriton. Used by the tests, the load test and ``.ci/setup_serving.sh``.

The bundled server needs three things outside PyTriton: the Python-backend stub of this Python version
beside ``libtriton_python.so``; this interpreter's own ``libpython`` first on ``LD_LIBRARY_PATH``; and a
``python3`` first on ``PATH`` whose packages the stub should see. That stub was built against NumPy 1.x,
so its environment is a small venv holding numpy<2 that also sees this environment's site-packages
(torch, fastmvit, Pillow); NumPy 2 in this environment stays untouched.

    python -m fastmvit.serving.launch install-tritonserver     # what .ci/setup_serving.sh runs
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["free_port", "ServerProcess", "TritonInstall", "find_tritonserver", "install_tritonserver",
           "PYTRITON_VERSION"]

PYTRITON_VERSION = "0.7.0"
INSTALL_ENV = "FASTMVIT_TRITONSERVER_INSTALL"  # path of an install.json, to override the default place


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 2.0) -> Optional[int]:
    """The status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


class ServerProcess:
    """A server started in its own process group, with its output in a log file; ``stop`` kills the group
    (the server and every worker it started)."""

    def __init__(self, cmd: Sequence[str], *, env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                 log_path: Optional[str] = None, name: str = "server"):
        self.cmd, self.env, self.cwd, self.name = list(cmd), env, cwd, name
        self.log_path = log_path or tempfile.mkstemp(prefix=f"fastmvit-{name}-", suffix=".log")[1]
        self.proc: Optional[subprocess.Popen] = None
        self.statuses: List[Optional[int]] = []  # what the readiness poll saw, in order

    def start(self) -> "ServerProcess":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def wait_ready(self, url: str, timeout: float = 180.0, ready: Callable[[Optional[int]], bool] = lambda s: s == 200):
        """Poll ``url`` until ``ready(status)``; raise with the log's tail if the server dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                                   f"{self.log_tail()}")
            status = http_status(url)
            self.statuses.append(status)
            if ready(status):
                return self
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not ready at {url} after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the group, then SIGKILL to whatever of it is left after ``grace`` seconds."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            if sig == signal.SIGTERM:
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
        self.proc.wait(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# -------------------------------------------------------------------------------------------------
# tritonserver from the nvidia-pytriton wheel

@dataclass
class TritonInstall:
    """Where the pieces of a runnable ``tritonserver`` are; written to ``install.json`` by the installer."""

    tritonserver: str
    backend_directory: str
    stub_env: str
    path_prepend: List[str]
    ld_library_path: List[str]
    python_version: str
    pytriton_version: str

    def env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """The server's environment: the stub's venv first on PATH, this Python's libpython first."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join(self.path_prepend + [env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(self.ld_library_path + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
        env.pop("PYTHONPATH", None)  # the stub ignores it; don't let it mislead a reader of the log
        env.pop("VIRTUAL_ENV", None)
        return env

    def command(self, repository: str, http_port: int, grpc_port: int, metrics_port: int,
                extra: Sequence[str] = ()) -> List[str]:
        """A ``tritonserver`` command line bound to 127.0.0.1."""
        return [self.tritonserver, f"--model-repository={repository}",
                f"--backend-directory={self.backend_directory}",
                "--http-address=127.0.0.1", f"--http-port={http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
                "--metrics-address=127.0.0.1", f"--metrics-port={metrics_port}",
                "--allow-gpu-metrics=false", "--exit-timeout-secs=5", "--log-verbose=0", *extra]

    def check(self) -> Optional[str]:
        """None if every piece is there, else what is missing."""
        for p in [self.tritonserver, os.path.join(self.backend_directory, "python", "triton_python_backend_stub"),
                  os.path.join(self.stub_env, "bin", "python3")]:
            if not os.path.exists(p):
                return f"{p} is missing"
        if self.python_version != _pyver():
            return f"set up for Python {self.python_version}, running {_pyver()}"
        return None


def _pyver() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def default_install_dir() -> Path:
    """Beside this environment: ``<sys.prefix>/fastmvit-tritonserver`` (a venv's folder when in one)."""
    return Path(sys.prefix) / "fastmvit-tritonserver"


def find_tritonserver() -> Optional[TritonInstall]:
    """The install recorded by ``install_tritonserver``, if it is complete and fits this Python."""
    path = Path(os.environ.get(INSTALL_ENV) or default_install_dir() / "install.json")
    try:
        install = TritonInstall(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return install if install.check() is None else None


def _say(msg: str) -> None:
    print(f"setup_serving: {msg}", flush=True)


def _run(cmd: Sequence[str], **kw) -> None:
    subprocess.run(list(cmd), check=True, **kw)


def install_tritonserver(root: Optional[Path] = None, version: str = PYTRITON_VERSION) -> TritonInstall:
    """Unpack ``nvidia-pytriton==version`` (downloaded with pip, no dependencies: its numpy<2 pin never
    reaches this environment), lay out a Python backend for this Python, make the stub's venv, and write
    ``install.json``. Idempotent: each step is skipped when its result is there."""
    root = Path(root or default_install_dir())
    root.mkdir(parents=True, exist_ok=True)
    wheel_dir = root / f"nvidia-pytriton-{version}"
    server_dir = wheel_dir / "pytriton" / "tritonserver"
    if not (server_dir / "bin" / "tritonserver").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            _say(f"downloading nvidia-pytriton=={version} (the wheel only, ~55 MB)")
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                  f"nvidia-pytriton=={version}"])
            wheel = next(Path(tmp).glob("nvidia_pytriton-*.whl"))
            staging = root / f".unpacking-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            with zipfile.ZipFile(wheel) as z:
                z.extractall(staging)
            shutil.rmtree(wheel_dir, ignore_errors=True)
            staging.rename(wheel_dir)
        _say(f"unpacked tritonserver into {wheel_dir}")
    else:
        _say(f"tritonserver already unpacked in {wheel_dir}")
    for f in [server_dir / "bin" / "tritonserver", *server_dir.glob("python_backend_stubs/*/triton_python_backend_stub")]:
        f.chmod(f.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)  # zip files keep no modes

    pyver = _pyver()
    stub = server_dir / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"nvidia-pytriton {version} has no Python-backend stub for Python {pyver}")
    backends = root / f"backends-py{pyver}"
    python_backend = backends / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    for src in [server_dir / "backends" / "python" / "libtriton_python.so",
                server_dir / "backends" / "python" / "triton_python_backend_utils.py", stub]:
        dst = python_backend / src.name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    _say(f"Python backend for Python {pyver} in {python_backend}")

    stub_env = root / f"stub-env-py{pyver}"
    site_packages = sysconfig.get_paths()["purelib"]
    pth = Path(sysconfig.get_paths(vars={"base": str(stub_env), "platbase": str(stub_env)})["purelib"]) / \
        "zz_fastmvit_project.pth"
    stub_python = stub_env / "bin" / "python3"
    probe = [str(stub_python), "-c", "import numpy, sys; sys.exit(int(numpy.__version__.split('.')[0]) >= 2)"]
    if not stub_python.exists() or subprocess.run(probe, capture_output=True).returncode != 0:
        _say(f"creating the stub's environment {stub_env} (numpy<2, sees {site_packages})")
        base_python = getattr(sys, "_base_executable", sys.executable)
        _run([base_python, "-m", "venv", "--clear", str(stub_env)])
        _run([str(stub_python), "-m", "pip", "install", "--quiet", "numpy<2"])
    else:
        _say(f"stub's environment ready in {stub_env}")
    # after the venv's own site-packages (numpy<2), so numpy 1 wins and everything else comes from here
    pth.write_text(f"import site; site.addsitedir({site_packages!r})\n")

    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ldlib = sysconfig.get_config_var("LDLIBRARY") or ""
    if not (Path(libdir) / ldlib).exists():
        _say(f"warning: {libdir}/{ldlib} not found; the stub may load another libpython")
    install = TritonInstall(
        tritonserver=str(server_dir / "bin" / "tritonserver"),
        backend_directory=str(backends),
        stub_env=str(stub_env),
        path_prepend=[str(stub_env / "bin")],
        ld_library_path=[libdir, str(wheel_dir / "nvidia_pytriton.libs")],
        python_version=pyver,
        pytriton_version=version,
    )
    (root / "install.json").write_text(json.dumps(asdict(install), indent=2) + "\n")
    missing = install.check()
    if missing:
        raise RuntimeError(f"tritonserver install incomplete: {missing}")
    _say(f"wrote {root / 'install.json'}")
    return install


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmvit.serving.launch")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("install-tritonserver", help="unpack the tritonserver of nvidia-pytriton for this Python")
    i.add_argument("--dir", help=f"where (default {default_install_dir()})")
    i.add_argument("--version", default=PYTRITON_VERSION)
    args = p.parse_args(argv)
    install_tritonserver(Path(args.dir) if args.dir else None, args.version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
