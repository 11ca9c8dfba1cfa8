#!/usr/bin/env python
"""A local Ray head for `untrac-ray submit`: `ray start --head` on loopback, with the dashboard
and its job server, and token authentication on (Ray 2.60's default for local clusters).

    .venv/bin/python cluster/local_head.py start     # prints the two `export` lines to use
    .venv/bin/python cluster/local_head.py stop      # stops this head only

Run it with the interpreter that has untrac-ray installed: a job's entrypoint runs in the
head's environment, and this script puts that interpreter first on the head's PATH (so the
entrypoint's `python` is it). The token is generated into the state folder (mode 600), never
printed. `stop` kills this head's process group (`ray start --block` in a session of its own)
and whatever still runs in its temp dir; it never runs a bare `ray stop`, which would stop
every Ray on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_STATE = Path.home() / ".untrac-ray" / "local-head"
PORT_FLAGS = ("--port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--node-manager-port",
              "--object-manager-port", "--metrics-export-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(state: Path) -> dict | None:
    """The running head's record (url, pid, token file), or None."""
    record = state / "head.json"
    if not record.is_file():
        return None
    info = json.loads(record.read_text())
    return info if _alive(info["pid"]) else None


def _token_file(state: Path) -> Path:
    path = state / "auth_token"
    if not path.is_file():
        path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def _wait_for_job_server(url: str, token: str, proc: subprocess.Popen, log: Path,
                         timeout: float) -> float:
    """Poll the job server until it answers; the seconds it took."""
    import requests

    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise SystemExit("ray start --head exited:\n" + log.read_text()[-3000:])
        try:
            r = requests.get(f"{url}/api/jobs/", timeout=2,
                             headers={"Authorization": f"Bearer {token}"})
            if r.status_code == 200:
                return time.monotonic() - start
        except requests.RequestException:
            pass
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"the job server at {url} did not answer within {timeout:.0f} s")
        time.sleep(0.25)


def start(state: Path, dashboard_port: int | None, port: int | None, free_ports: bool,
          num_cpus: int | None, num_gpus: int | None, object_store_mb: int | None,
          timeout: float) -> dict:
    """Start the head (or report the one running) and wait until its job server answers."""
    state.mkdir(parents=True, exist_ok=True)
    running = read_state(state)
    if running:
        return running
    temp_dir = state / "ray"
    if len(str(temp_dir)) > 60:
        raise SystemExit(f"{temp_dir} is too long for Ray's Unix sockets; use a shorter --state")
    token_file = _token_file(state)
    bin_dir = Path(sys.executable).parent
    ray = shutil.which("ray", path=str(bin_dir)) or shutil.which("ray")
    if ray is None:
        raise SystemExit("no `ray` command: install untrac-ray (it brings ray[default])")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
               PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    dashboard = dashboard_port or (free_port() if free_ports else 8265)
    ports = {"--dashboard-port": dashboard,
             "--port": port or (free_port() if free_ports else 6379)}
    if free_ports:  # every port of its own, so it runs beside other Ray instances
        for flag in PORT_FLAGS:
            ports.setdefault(flag, free_port())
    cmd = [ray, "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--temp-dir", str(temp_dir)]
    for flag, number in ports.items():
        cmd += [flag, str(number)]
    if free_ports:  # a workers' range that holds none of the ports above (Ray refuses that)
        low = min(free_port(), 60000)
        while any(low <= number <= low + 200 for number in ports.values()):
            low = min(free_port(), 60000) - 201
        cmd += ["--min-worker-port", str(low), "--max-worker-port", str(low + 200)]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(num_gpus)]
    if object_store_mb:
        cmd += ["--object-store-memory", str(object_store_mb * 2**20)]
    log = state / "head.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dashboard}"
    info = {"pid": proc.pid, "url": url, "token_file": str(token_file),
            "temp_dir": str(temp_dir), "state": str(state)}
    try:
        info["ready_seconds"] = round(
            _wait_for_job_server(url, token_file.read_text().strip(), proc, log, timeout), 1)
    except BaseException:
        stop(state, info)
        raise
    (state / "head.json").write_text(json.dumps(info, indent=2))
    return info


def stop(state: Path, info: dict | None = None) -> bool:
    """Stop this head only; False when none was running."""
    import psutil

    info = info or read_state(state)
    record = state / "head.json"
    if info is None:
        record.unlink(missing_ok=True)
        return False
    try:
        os.killpg(info["pid"], signal.SIGKILL)  # SIGTERM leaves gcs and raylet running
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the `ray start` process is gone (or a zombie)
        try:
            if psutil.Process(info["pid"]).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    # A job's driver runs in a session of its own, in a folder under the head's temp dir.
    root = str(state.resolve())
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            here = (p.info["cwd"] or "").startswith(root) or any(
                root in part for part in p.info["cmdline"] or [])
            if here and p.pid != os.getpid():
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    record.unlink(missing_ok=True)
    return True


def exports(info: dict) -> str:
    return (f"export RAY_ADDRESS={info['url']}\n"
            f"export RAY_AUTH_TOKEN_PATH={info['token_file']}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "env"])
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE,
                        help=f"folder for the token, logs and Ray's temp dir ({DEFAULT_STATE})")
    parser.add_argument("--dashboard-port", type=int, help="default 8265 (free with --free-ports)")
    parser.add_argument("--port", type=int, help="GCS port, default 6379 (free with --free-ports)")
    parser.add_argument("--free-ports", action="store_true",
                        help="pick free ports for everything (run beside other Ray instances)")
    parser.add_argument("--num-cpus", type=int)
    parser.add_argument("--num-gpus", type=int, help="logical GPUs are fine for trying placement")
    parser.add_argument("--object-store-mb", type=int)
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds to wait for the job server")
    args = parser.parse_args(argv)
    state = args.state.expanduser().resolve()
    if args.command == "start":
        info = start(state, args.dashboard_port, args.port, args.free_ports, args.num_cpus,
                     args.num_gpus, args.object_store_mb, args.timeout)
        print(f"Ray head at {info['url']} (job server answered "
              f"{info.get('ready_seconds', 0)} s after start); use it with:", file=sys.stderr)
        sys.stdout.write(exports(info))
    elif args.command == "env":
        info = read_state(state)
        if info is None:
            print("no local head is running; start one first", file=sys.stderr)
            return 1
        sys.stdout.write(exports(info))
    else:
        print("stopped" if stop(state) else "no local head was running", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
