"""A fork server for the stage processes of one `make run`.

``python -m flows.pipeline --run-dvc`` starts one (``serving``) once the shared Prefect API and the
MLflow parent run are known, so both are in its environment. It imports torch, Prefect, MLflow and
the project once; then, for each stage DVC runs (``python -m flows.stage X``, a client that imports
only the standard library), it forks a child that takes the client's argv, working directory,
environment and stdin/stdout/stderr, runs ``flows.pipeline.main`` and exits without the
interpreter's teardown. A stage so skips the imports (about 2.6 s on a 2-core machine), MLflow's
SQL store setup (1.9 s, nearly all of it imports too) and the exit (1.3 s): what is left is an
interpreter start for the client and a fork.

Fork safety. The server starts no thread and runs no torch op (the OpenMP pool of a parent does not
survive a fork); it checks that only its main thread exists before every fork. What it warms is
code and MLflow's cached store objects, never a connection: the pools of MLflow's SQLAlchemy engines
are emptied (``dispose``) before serving, and each child drops whatever its pools inherited without
closing it (``dispose(close=False)``, SQLAlchemy's rule for forked processes). Prefect's settings,
the BLAS/OpenMP thread counts and ``sys.path`` were read from the environment at import, so a
request whose environment differs there, or whose project is another one, or that finds a module
of the project changed since the server imported it, is declined: the client then runs the stage
itself, as before. A dead or missing server is the same: the client falls back.

Signals: the server lives in a session of its own (Ctrl-C does not reach it); each child leads its
own process group, and the client forwards the signals it gets (Ctrl-C, SIGTERM, Ctrl-Z) to that
group. The server ends when ``serving`` ends, and also when the process that started it dies (its
stdin, a pipe from that process, reaches EOF); a stage it is running then finishes first.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

from flows.stage import ENV, OFF, recv_request, send_line

# Prefixes of the variables that what the server imports reads once, at import (Prefect's settings,
# OpenMP's and BLAS's thread counts, sys.path, MLflow's store options): they must match a request's.
IMPORT_TIME_ENV = ("PREFECT_", "MLFLOW_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "CUDA_", "PYTORCH_",
                   "TORCH", "PYTHON", "LD_", "DASK_", "CYCLEMERGE_PROJECT", "CYCLEMERGE_VENV")
PACKAGES = ("cyclemerge", "tasks", "flows")  # their modules are checked for changes before every fork
STORE_MODULES = ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store")
# What stages import on first use, each time anew in a process of their own: torch._dynamo (2 s, pulled
# in by the optimisers of train and gates and by evaluate's torch.export), GitPython (MLflow's model logging).
LAZY_IMPORTS = ("torch._dynamo", "torch.export", "mlflow.pytorch", "git")
REQUEST_TIMEOUT = 10.0  # a client that connects and sends nothing cannot hold up the next stage
KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL for a stage that must stop
STOP_GRACE = 0.5  # an idle server exits at once when told; longer means it is still importing
STOP_GRACE_INTERRUPTED = 10.0  # after Ctrl-C: the running stage's own interrupt handling goes first


def _say(message: str) -> None:
    print(f"stage server: {message}", file=sys.stderr, flush=True)


# --- the client's side of the lifetime: start, hand out the address, stop ---------------------------


@contextmanager
def serving(env: dict[str, str], root: Path, tracking_uri: str | None = None,
            command: list[str] | None = None) -> Iterator[dict[str, str]]:
    """A stage server for the stages run with ``env`` in ``root``; yields the variables that send them to it.

    It yields ``{}`` (every stage then runs as a process of its own, as before) when ``env`` says
    ``CYCLEMERGE_STAGE_SERVER=off`` or the server cannot be started. ``tracking_uri``: an MLflow
    SQLite store to warm. ``command`` replaces ``python -m flows.stage_server`` (the speed benchmark
    starts it under a probe).
    """
    if env.get(ENV) == OFF:
        yield {}
        return
    folder = tempfile.mkdtemp(prefix="cyclemerge-stages-")
    if len(folder) > 80:  # a Unix socket's path has at most 107 bytes
        shutil.rmtree(folder, ignore_errors=True)
        folder = tempfile.mkdtemp(prefix="cyclemerge-stages-", dir="/tmp")
    path = os.path.join(folder, "socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(16)
        cmd = [*(command or [sys.executable, "-m", "flows.stage_server"]), "--listen-fd", str(listener.fileno())]
        if tracking_uri:
            cmd += ["--tracking-uri", tracking_uri]
        # Its own session: a Ctrl-C in the terminal reaches the stage through its client, never the server.
        proc = subprocess.Popen(cmd, cwd=root, env={k: v for k, v in env.items() if k != ENV}, stdin=subprocess.PIPE,
                                pass_fds=[listener.fileno()], start_new_session=True)
    except OSError as e:
        _say(f"not started ({e}); each stage imports the stack itself")
        proc = None
    finally:
        listener.close()  # the server holds its own copy: once the server is gone, clients are refused at once
    if proc is None:
        shutil.rmtree(folder, ignore_errors=True)
        yield {}
        return
    grace = STOP_GRACE
    try:
        yield {ENV: path}
    except BaseException:
        grace = STOP_GRACE_INTERRUPTED
        raise
    finally:
        _stop(proc, grace)
        shutil.rmtree(folder, ignore_errors=True)


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """EOF on its stdin (exit once idle), then SIGTERM (stop the stage it runs, if any), then SIGKILL."""
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        proc.terminate()
    try:
        proc.wait(timeout=KILL_GRACE + 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the server ----------------------------------------------------------------------------------


def _store_engines() -> list:
    engines = []
    for name in STORE_MODULES:
        store = getattr(sys.modules.get(name), "SqlAlchemyStore", None)
        engines += list(getattr(store, "_engine_map", {}).values())
    return engines


def _warm(tracking_uri: str | None) -> dict[str, str]:
    """Import the stack (and MLflow's SQL store for ``tracking_uri``); the environment as a stage sees it."""
    import flows._env  # noqa: F401  (its defaults first, as in a stage process)

    env = dict(os.environ)  # with flows._env's defaults, before anything imported below changes it
    import importlib

    import flows.pipeline  # noqa: F401  torch, Prefect, MLflow, tasks.*, cyclemerge.*

    for name in STORE_MODULES:  # what most of a stage's 1.9 s of MLflow setup was
        importlib.import_module(name)
    for name in LAZY_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a stage that needs it meets the error itself
            _say(f"{name} not imported ({e})")
    db = tracking_uri[len("sqlite:///"):] if tracking_uri and tracking_uri.startswith("sqlite:///") else None
    if db and Path(db).is_file():  # never create or migrate a store here: the stages do that, as before
        try:
            from mlflow import MlflowClient

            # Cached by MLflow per URI (TrackingStoreRegistry, SqlAlchemyStore._engine_map): the children reuse it.
            MlflowClient(tracking_uri=tracking_uri)._get_registry_client()
        except Exception as e:  # noqa: BLE001 - warming is optional; the stage meets any real problem itself
            _say(f"MLflow store {tracking_uri} not warmed ({e})")
    for engine in _store_engines():
        engine.dispose()  # no SQLite connection may cross a fork
    return env


def _code_stamps() -> dict[str, tuple[int, int] | None]:
    stamps = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and name.partition(".")[0] in PACKAGES:
            stamps[path] = _stamp(path)
    return stamps


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
        return st.st_mtime_ns, st.st_size
    except OSError:
        return None


def _with_defaults(env: dict[str, str]) -> dict[str, str]:
    import flows._env

    return {**flows._env._DEFAULTS, **env}


def _import_time_view(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)}


class Server:
    def __init__(self, listener: socket.socket, control: int, env: dict[str, str]):
        self.listener, self.control = listener, control
        self.env_view = _import_time_view(env)
        self.stamps = _code_stamps()
        self.stopping = False  # EOF on the control pipe: serve no more, finish a running stage
        self.terminating = False  # SIGTERM: stop a running stage, exit
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, _signum, _frame) -> None:
        self.terminating = True

    def _read_control(self) -> None:
        try:
            data = os.read(self.control, 64)
        except OSError:
            data = b""
        if not data:
            self.stopping = True

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 64):
                pass
        except (BlockingIOError, OSError):
            pass

    def run(self) -> None:
        while not (self.stopping or self.terminating):
            ready, _, _ = select.select([self.listener, self.control, self.wake_r], [], [])
            if self.wake_r in ready:
                self._drain_wakeups()
            if self.control in ready:
                self._read_control()
            if self.listener in ready and not (self.stopping or self.terminating):
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    continue
                with conn:
                    self.handle(conn)

    def declined(self, request: dict, fds: list[int]) -> str | None:
        """Why this request must run in a fresh process instead (None: it can run here)."""
        import flows._env

        if len(fds) != len(request.get("fds", ())):
            return "its file descriptors did not arrive"
        env = _with_defaults(request["env"])
        root = Path(env.get("CYCLEMERGE_PROJECT") or request["cwd"]).resolve()
        if root != flows._env.ROOT:
            return f"it serves the project {flows._env.ROOT}, not {root}"
        view = _import_time_view(env)
        for key in sorted(set(view) | set(self.env_view)):
            if view.get(key) != self.env_view.get(key):
                return f"{key} differs from the server's environment"
        for path, stamp in self.stamps.items():
            if _stamp(path) != stamp:
                return f"{path} changed since the server imported it"
        if threading.active_count() != 1:
            return "the server has threads running; a fork would copy their locks"
        return None

    def handle(self, conn: socket.socket) -> None:
        if hasattr(socket, "SO_PEERCRED"):  # beside the folder only its owner may enter: only our own user
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] != os.getuid():
                return
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            request, fds = recv_request(conn)
        except (OSError, ValueError, KeyError):
            return
        try:
            try:
                why = self.declined(request, fds)
            except (KeyError, TypeError, ValueError) as e:
                why = f"a malformed request ({e!r})"
            if why:
                send_line(conn, {"declined": why})
                return
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(request, fds, [self.listener, conn, self.control, self.wake_r, self.wake_w])
            try:
                os.setpgid(pid, pid)  # also done by the child: whichever runs first, the client's killpg finds it
            except OSError:
                pass
        except OSError:
            return
        finally:
            for fd in fds:
                os.close(fd)
        conn.settimeout(None)
        try:
            send_line(conn, {"pid": pid})
        except OSError:
            pass  # the client is gone: _wait notices and stops the stage
        status = self._wait(pid, conn)
        try:
            send_line(conn, status)
        except OSError:
            pass

    def _wait(self, pid: int, conn: socket.socket) -> dict:
        """The child's exit status; stops it when its client disappears or the server gets SIGTERM."""
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None  # polled instead
        client, killed_at = conn, None
        try:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if killed_at is None and (self.terminating or client is None):
                    self._signal(pid, signal.SIGTERM)
                    killed_at = time.monotonic()
                elif killed_at is not None and time.monotonic() - killed_at > KILL_GRACE:
                    self._signal(pid, signal.SIGKILL)
                watch = [fd for fd in (client, self.wake_r, pidfd) if fd is not None]
                if not self.stopping:
                    watch.append(self.control)
                timeout = 0.05 if pidfd is None else (None if killed_at is None else 0.5)
                ready, _, _ = select.select(watch, [], [], timeout)
                if self.wake_r in ready:
                    self._drain_wakeups()
                if self.control in ready:
                    self._read_control()
                if client is not None and client in ready:
                    try:
                        gone = not client.recv(64)
                    except OSError:
                        gone = True
                    if gone:
                        client = None
        finally:
            if pidfd is not None:
                os.close(pidfd)
        if os.WIFSIGNALED(status):
            return {"signal": os.WTERMSIG(status)}
        return {"exit": os.waitstatus_to_exitcode(status)}

    @staticmethod
    def _signal(pid: int, signum: int) -> None:
        try:
            os.killpg(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


# --- the child: one stage -------------------------------------------------------------------------


def _child(request: dict, fds: list[int], inherited: list[socket.socket | int]) -> NoReturn:
    rc = 1
    try:
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_DFL)
        for item in inherited:  # the server's sockets and pipes
            item.close() if isinstance(item, socket.socket) else os.close(item)
        targets = list(request["fds"])
        for fd, target in zip(fds, targets):
            os.dup2(fd, target)
        for target in {0, 1, 2} - set(targets):  # closed in the client: nothing to read, nowhere to write
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, target)
            os.close(devnull)
        for fd in fds:
            if fd not in (0, 1, 2):
                os.close(fd)
        os.chdir(request["cwd"])
        env = _with_defaults(request["env"])
        env.pop(ENV, None)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = list(request.get("sys_argv") or ["flows.stage"])
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # the buffering a fresh process would pick for the client's streams
                stream.reconfigure(line_buffering=stream is sys.stderr or os.isatty(stream.fileno()))
        for engine in _store_engines():
            engine.dispose(close=False)  # the server's pool entries are not this process's to use or close
        rc = _run_main(list(request["argv"]))
    except KeyboardInterrupt:  # a Ctrl-C before the stage began
        rc = 130
    except BaseException:  # noqa: BLE001 - whatever happens, this process must end here, not in the server loop
        traceback.print_exc()
        rc = 1
    finally:
        _exit(rc)


def _run_main(argv: list[str]) -> int:
    import flows.pipeline

    try:
        return int(flows.pipeline.main(argv) or 0)
    except SystemExit as e:  # argparse's usage errors, as the interpreter would turn them into an exit code
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        return 1


def _exit(rc: int) -> NoReturn:
    """What the interpreter's exit does that matters, then ``os._exit``: no module teardown, no GC.

    ``threading._shutdown`` runs the callbacks Prefect registers to drain its log and event workers
    (task run states reach the API as events), and joins non-daemon threads; ``atexit`` then runs
    logging's flush and the rest. Only the freeing of the process's objects is skipped: the seconds
    a big interpreter spends on it change nothing outside the process.
    """
    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    try:
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.stage_server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen-fd", type=int, required=True, help="a listening Unix socket (inherited)")
    ap.add_argument("--tracking-uri", help="an MLflow SQLite store to warm")
    args = ap.parse_args(argv)
    listener = socket.socket(fileno=args.listen_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        try:
            env = _warm(args.tracking_uri)
        except Exception:  # noqa: BLE001 - clients find the socket closed and run their stages themselves
            _say("could not import the pipeline; each stage runs in a process of its own")
            traceback.print_exc()
            return 1
        if threading.active_count() != 1:
            _say(f"threads running after the imports ({[t.name for t in threading.enumerate()]}); not serving")
            return 1
        gc.freeze()  # the children's collections then leave the imported objects' pages shared
        Server(listener, sys.stdin.fileno(), env).run()
        return 0
    finally:
        _remove_socket(listener)


def _remove_socket(listener: socket.socket) -> None:
    """The socket file and its folder, also when whoever started the server died without cleaning up."""
    try:
        path = listener.getsockname()
        listener.close()
        if isinstance(path, str) and path:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))  # only an emptied folder: never anything else
    except OSError:
        pass


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    for s in (sys.stdout, sys.stderr):
        s.flush()
    os._exit(code)  # nothing to flush or close: skip the teardown of everything imported
