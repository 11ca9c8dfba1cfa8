#!/usr/bin/env python
"""A local Ray head for `untrac-ray submit`: `ray start --head` on loopback, with the dashboard
and its job server, and token authentication on (Ray 2.60's default for local clusters).

    .venv/bin/python cluster/local_head.py start     # prints the two `export` lines to use
    .venv/bin/python cluster/local_head.py stop      # stops this head only

Run it with the interpreter that has untrac-ray installed: a job's entrypoint runs in the
head's environment, and this script puts that interpreter first on the head's PATH (so the
entrypoint's `python` is it). The state folder is made private (mode 700) and the token is
written into it as a file created with mode 600 (never readable by others, not even for a
moment), kept across restarts, and never printed.

`stop` stops exactly the processes this head started, and never a process that merely names the
state folder (an editor, a `tail -f` of the log, a shell whose folder is there). `start` runs
`ray start --block` in a session of its own and records its pid, which is also that session's
id, with its start time. `stop` kills (SIGKILL; SIGTERM leaves gcs and raylet running):

1. every process of that session (`os.getsid(pid)` equal to the recorded id): `ray start`,
   gcs_server, raylet, the dashboard and its agents, the runtime-env agent, workers, even
   those in process groups of their own. The session is trusted only if its leader is the
   recorded process (same start time) or gone: Linux does not hand out a pid that is still a
   live session's id, so a session whose leader died is still this head's;
2. every descendant of those, found before anything is killed: Ray starts a job's driver in a
   session of its own (so `stop` ends running jobs too);
3. leftovers outside both (an earlier, interrupted stop): a process that is Ray's by name
   (`gcs_server`, `raylet`, `ray::...` workers, or Python running Ray's own dashboard, agent,
   runtime-env agent or log monitor scripts) AND has a path argument inside this head's temp
   dir (Ray's session dir is there). A path in the command line alone never qualifies.

It never runs a bare `ray stop`, which would stop every Ray on the machine.
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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath

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


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _same_process(pid: int, create_time: float | None) -> bool:
    """Whether `pid` is still the process recorded with that start time (not a reused pid)."""
    if not _alive(pid):
        return False
    if create_time is None:  # a record from before start times were kept
        return True
    now = _create_time(pid)
    return now is not None and abs(now - create_time) < 0.05


def read_record(state: Path) -> dict | None:
    """The head's record (url, pid, session id, token file, temp dir), running or not."""
    record = state / "head.json"
    if not record.is_file():
        return None
    return json.loads(record.read_text())


def read_state(state: Path) -> dict | None:
    """The running head's record (url, pid, token file), or None."""
    info = read_record(state)
    if info is None:
        return None
    return info if _same_process(info["pid"], info.get("create_time")) else None


def private_folder(path: Path) -> Path:
    """Create `path` (and its parents) and make it readable by its owner only (mode 700)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def token_file(state: Path) -> Path:
    """The head's token file, `state/auth_token`: an existing token is kept (its mode set to
    600); a new one is written to a temporary file created with mode 600 (O_EXCL, so never
    through someone else's file or link) and then linked into place, so the token never exists
    with wider permissions, nor half-written, and two starts at once end with one token."""
    path = state / "auth_token"
    for _ in range(3):
        try:
            if path.read_text().strip():
                os.chmod(path, 0o600)
                return path
            path.unlink()  # an empty file: replace it
        except FileNotFoundError:
            pass
        tmp = state / f".auth_token.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
        try:
            os.fchmod(fd, 0o600)  # exactly 600 whatever the umask
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, path)  # atomic, and never replaces a token another start wrote
            except FileExistsError:
                continue  # another start won: keep its token
            except OSError:  # a filesystem without hard links
                os.replace(tmp, path)
            return path
        finally:
            tmp.unlink(missing_ok=True)
    raise RuntimeError(f"could not create the token file {path}")


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
    private_folder(state)
    running = read_state(state)
    if running:
        return running
    temp_dir = state / "ray"
    if len(str(temp_dir)) > 60:
        raise SystemExit(f"{temp_dir} is too long for Ray's Unix sockets; use a shorter --state")
    token = token_file(state)
    bin_dir = Path(sys.executable).parent
    ray = shutil.which("ray", path=str(bin_dir)) or shutil.which("ray")
    if ray is None:
        raise SystemExit("no `ray` command: install untrac-ray (it brings ray[default])")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
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
    # the pid is also the id of the session `ray start` leads (start_new_session)
    info = {"pid": proc.pid, "sid": proc.pid, "create_time": _create_time(proc.pid),
            "url": url, "token_file": str(token), "temp_dir": str(temp_dir),
            "state": str(state)}
    (state / "head.json").write_text(json.dumps(info, indent=2))  # so `stop` finds it
    try:
        info["ready_seconds"] = round(
            _wait_for_job_server(url, token.read_text().strip(), proc, log, timeout), 1)
    except BaseException:
        stop(state, info)
        raise
    (state / "head.json").write_text(json.dumps(info, indent=2))
    return info


@dataclass(frozen=True)
class Proc:
    """What `stop` knows of a process: enough to decide whether this head started it."""

    pid: int
    ppid: int
    sid: int | None  # None when it could not be read
    name: str
    cmdline: tuple[str, ...]


RAY_NAMES = frozenset({"gcs_server", "raylet"})
RAY_SCRIPTS = ("dashboard/dashboard.py", "dashboard/agent.py", "runtime_env/agent/main.py",
               "_private/log_monitor.py", "autoscaler/_private/monitor.py",
               "_private/workers/default_worker.py", "util/client/server/server.py")


def is_ray_process(name: str, cmdline: Iterable[str]) -> bool:
    """A Ray process by its name: gcs_server, raylet, a `ray::...` worker, or Python running one
    of Ray's own scripts (dashboard, dashboard agent, runtime-env agent, log monitor, ...)."""
    argv = list(cmdline)
    if name in RAY_NAMES or name.startswith("ray::") or (argv and argv[0].startswith("ray::")):
        return True
    if not argv:
        return False
    program = argv[0]
    if PurePath(program).name.startswith("python"):  # the script (or module) it runs
        rest = iter(argv[1:])
        for arg in rest:
            if arg == "-m":
                return next(rest, "") == "ray.util.client.server"
            if arg == "-c":
                return False
            if not arg.startswith("-"):
                program = arg
                break
        else:
            return False
    path = "/" + program.replace(os.sep, "/")
    return path.endswith(RAY_SCRIPTS) and "/ray/" in path


def has_path_under(cmdline: Iterable[str], folder: str) -> bool:
    """Whether an argument (or the value of a `--flag=value`) is `folder` or a path inside it."""
    root = folder.rstrip(os.sep)
    for arg in cmdline:
        value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
        if value == root or value.startswith(root + os.sep):
            return True
    return False


def processes_to_stop(procs: Iterable[Proc], sid: int | None, temp_dir: str,
                      me: int | None = None) -> set[int]:
    """The pids this head started, by the rule in the module's docstring: the members of
    session `sid` (None: the session is not trusted), their descendants, and Ray processes
    (by name) with a path argument inside `temp_dir`. Never `me`, nor anything else."""
    procs = list(procs)
    chosen = {p.pid for p in procs if sid is not None and p.sid == sid}
    children: dict[int, list[int]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p.pid)
    todo = list(chosen)
    while todo:  # descendants, even in sessions of their own (a job's driver)
        for child in children.get(todo.pop(), []):
            if child not in chosen:
                chosen.add(child)
                todo.append(child)
    chosen |= {p.pid for p in procs
               if is_ray_process(p.name, p.cmdline) and has_path_under(p.cmdline, temp_dir)}
    chosen.discard(me if me is not None else os.getpid())
    return chosen


def snapshot() -> dict[int, tuple[Proc, float]]:
    """Every process now, with its start time (to not kill a pid reused meanwhile)."""
    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "ppid", "name", "cmdline", "create_time", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            sid = os.getsid(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError):
            sid = None
        found[p.pid] = (Proc(p.pid, p.info["ppid"] or 0, sid, p.info["name"] or "",
                             tuple(p.info["cmdline"] or ())), p.info["create_time"] or 0.0)
    return found


def _kill(pids: Iterable[int], seen: dict[int, tuple[Proc, float]]) -> list:
    """SIGKILL these pids if each is still the process seen; the psutil handles to wait on."""
    import psutil

    killed = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - seen[pid][1]) >= 0.05:
                continue  # the pid now names another process
            p.kill()
            killed.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return killed


def _wait_gone(procs: list, timeout: float) -> None:
    """Until each process is gone or a zombie (its parent reaps it, or it is ours to reap)."""
    import psutil

    deadline = time.monotonic() + timeout
    while procs and time.monotonic() < deadline:
        left = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
                else:
                    p.wait(timeout=0)  # reaps it when it is our child (a failed start)
            except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
                continue
        procs = left
        if procs:
            time.sleep(0.05)


def stop(state: Path, info: dict | None = None) -> bool:
    """Stop this head only, by the rule in the module's docstring; False when nothing of it
    was running."""
    info = info or read_record(state)
    record = state / "head.json"
    if info is None:
        record.unlink(missing_ok=True)
        return False
    sid = info.get("sid", info["pid"])
    leader_alive = _alive(sid)
    trusted = not leader_alive or _same_process(sid, info.get("create_time"))
    temp_dir = info.get("temp_dir") or str(state / "ray")
    stopped = False
    for _ in range(3):  # again, for what was being started while the first sweep ran
        seen = snapshot()
        pids = processes_to_stop((p for p, _ in seen.values()), sid if trusted else None,
                                 temp_dir)
        if not pids:
            break
        if trusted and leader_alive:
            try:  # the whole group at once, so that no part of it restarts another
                os.killpg(sid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _wait_gone(_kill(pids, seen), timeout=30)
        stopped = True
        leader_alive = _alive(sid)
    record.unlink(missing_ok=True)
    return stopped


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
