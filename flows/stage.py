"""One pipeline stage, what each dvc.yaml stage calls.

    python -m flows.stage gates                  # the same as python -m flows.pipeline --stage gates
    python -m flows.stage gates --force gates    # any further flows.pipeline option is passed on

Under `make run` (``python -m flows.pipeline --run-dvc``) a stage server (flows/stage_server.py)
has torch, Prefect, MLflow and the project imported already: this process hands it the stage and
waits for it, and so skips the seconds of imports and interpreter exit a fresh process pays per
stage. Without a server (a plain ``dvc repro``), or when the server cannot take the stage, the stage
runs in this process exactly as ``python -m flows.pipeline --stage X`` runs it.

Until that fallback only the standard library is imported, so delegating costs a bare interpreter
start. ``CYCLEMERGE_STAGE_SERVER=off`` in the environment of ``--run-dvc`` starts no server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time

ENV = "CYCLEMERGE_STAGE_SERVER"
OFF = "off"
HEADER = struct.Struct("!I")  # the request's length; the request follows as JSON
MAX_REQUEST = 4 << 20
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCONT)


def send_request(sock: socket.socket, request: dict, fds: list[int]) -> None:
    """The request as JSON, with ``fds`` passed along (SCM_RIGHTS) on its first bytes."""
    body = json.dumps(request).encode()
    socket.send_fds(sock, [HEADER.pack(len(body))], fds)
    sock.sendall(body)


def _recv_exact(sock: socket.socket, n: int, got: bytes = b"") -> bytes:
    while len(got) < n:
        chunk = sock.recv(min(n - len(got), 1 << 16))
        if not chunk:
            raise ConnectionError("connection closed in the middle of a request")
        got += chunk
    return got


def recv_request(sock: socket.socket, max_fds: int = 3) -> tuple[dict, list[int]]:
    """What ``send_request`` sent: the request and the file descriptors that came with it."""
    head, fds, flags, _ = socket.recv_fds(sock, HEADER.size, max_fds)
    try:
        if flags & socket.MSG_CTRUNC:
            raise ConnectionError("more file descriptors than expected")
        (size,) = HEADER.unpack(_recv_exact(sock, HEADER.size, head))
        if size > MAX_REQUEST:
            raise ConnectionError(f"request of {size} bytes")
        return json.loads(_recv_exact(sock, size)), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def send_line(sock: socket.socket, message: dict) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _note(path: str, why: str) -> None:
    # A fallback is slower by the imports; saying why keeps a dead server from going unnoticed.
    print(f"note: stage server {path} not used ({why}); running the stage in this process", file=sys.stderr,
          flush=True)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _wait_gone(pid: int) -> None:
    """Until process ``pid`` has exited (it is not ours to wait for: the server forked it)."""
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:  # the pid was reused by someone else's process: ours is gone
            return
        time.sleep(0.2)


def _forward_signals(pgid: int) -> None:
    """Signals meant for this process go to the stage's process group, as a terminal would send them."""
    def forward(signum, _frame):
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def suspend(signum, _frame):
        # Ctrl-Z: stop the stage, then this process; `fg` continues this one and SIGCONT the stage.
        forward(signum, _frame)
        os.kill(os.getpid(), signal.SIGSTOP)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    signal.signal(signal.SIGTSTP, suspend)


def _exit_like(status: dict) -> int:
    """This process's exit code for the stage's status; a stage killed by a signal kills this one alike."""
    if "signal" in status:
        signum = int(status["signal"])
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum  # a signal whose default is not to terminate
    return int(status["exit"])


def delegate(argv: list[str]) -> int | None:
    """Run ``flows.pipeline.main(argv)`` on the stage server; its exit code, or None to run it here."""
    path = os.environ.get(ENV, "")
    if not path or path == OFF:
        return None
    fds = [fd for fd in (0, 1, 2) if _is_open(fd)]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
            send_request(sock, {"argv": argv, "sys_argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ),
                                "fds": fds}, fds)
            replies = sock.makefile("rb")
            first = replies.readline()
            started = json.loads(first) if first else {"declined": "it closed the connection"}
        except (OSError, ValueError) as e:
            _note(path, getattr(e, "strerror", None) or str(e) or type(e).__name__)
            return None
        if "declined" in started:
            _note(path, started["declined"])
            return None
        pid = int(started["pid"])
        # From here on the stage runs: it must never run a second time in this process.
        _forward_signals(pid)
        try:
            last = replies.readline()
        except OSError:
            last = b""
        if not last:
            _wait_gone(pid)
            print(f"error: stage server {path} stopped while the stage ran (pid {pid}); its exit status is "
                  "unknown", file=sys.stderr)
            return 1
        return _exit_like(json.loads(last))
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: python -m flows.stage STAGE [python -m flows.pipeline options]", file=sys.stderr)
        return 2
    pipeline_argv = ["--stage", *args]
    try:
        rc = delegate(pipeline_argv)
    except KeyboardInterrupt:  # before the stage began; a stage whose client is gone is stopped by the server
        return 130
    if rc is not None:
        return rc
    from flows.pipeline import main as run_here

    return run_here(pipeline_argv)


if __name__ == "__main__":
    sys.exit(main())
