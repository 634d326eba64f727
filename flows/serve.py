"""Serve the whole pipeline as a Prefect deployment that runs on a schedule.

    python -m flows.serve --cron "0 3 * * *"                      # every day at 03:00 (UTC unless --timezone)
    python -m flows.serve --interval 3600 --set gates.lam=0.05    # every hour, with an override
    python -m flows.serve --cron "0 3 * * 1" --params exp.yaml --name weekly

The process stays in the foreground and runs each scheduled flow run in a subprocess; Ctrl-C stops
it (and pauses the schedule). Every run is the same flow as `python -m flows.pipeline`, so one with
nothing changed is all cache hits. Runs are visible in the Prefect UI of the server it talks to.

Prefect's ephemeral API runs no scheduler, so a schedule served against it would never fire: with
no PREFECT_API_URL set this command starts a local Prefect server (state in .prefect/, UI on
--port) for as long as it serves. To deploy to a work pool instead, see prefect.yaml.
"""

from __future__ import annotations

import flows._env  # noqa: F401  (must precede prefect imports)

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from cyclemerge.config import ConfigError
from flows.pipeline import pipeline
from tasks.common import Project


def make_schedule(cron: str | None = None, interval: float | None = None, timezone: str | None = None):
    """A Prefect schedule from exactly one of a cron string or an interval in seconds."""
    from prefect.schedules import Cron, Interval

    if (cron is None) == (interval is None):
        raise ValueError("give exactly one of --cron or --interval")
    if cron is not None:
        return Cron(cron, timezone=timezone or "UTC")
    if interval <= 0:
        raise ValueError(f"--interval must be a positive number of seconds, got {interval}")
    return Interval(timedelta(seconds=interval), timezone=timezone or "UTC")


def make_deployment(*, name: str = "cyclemerge", cron: str | None = None, interval: float | None = None,
                    timezone: str | None = None, params: str = "params.yaml", overrides: list[str] | None = None,
                    project_dir: str | Path | None = None):
    """The pipeline flow as a RunnerDeployment with a schedule and its parameters.

    The params file and overrides are validated here, so a typo fails now rather than at 03:00.
    """
    root = Path(project_dir or flows._env.ROOT).resolve()
    project = Project.load(root, params, overrides or [])
    return pipeline.to_deployment(
        name=name,
        schedule=make_schedule(cron, interval, timezone),
        parameters={"params": str(project.params_path), "overrides": list(overrides or []),
                    "project_dir": str(root)},
        description=f"cyclemerge pipeline on {project.params_path.name} in {root}",
        tags=["cyclemerge"],
        concurrency_limit=1,  # one run per project folder at a time; a second would refuse its lock
    )


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def prefect_api(port: int, timeout: float = 180.0) -> Iterator[str]:
    """The Prefect API to serve against: PREFECT_API_URL when set, else a local server started here."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    url = f"http://127.0.0.1:{port}/api"
    if _healthy(url):  # a server from an earlier `prefect server start` on that port
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
        return
    log = Path(os.environ["PREFECT_HOME"]) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--scheduler"]
    with open(log, "ab") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local Prefect server did not start (see {log}); start one with "
                                   f"`prefect server start` and set PREFECT_API_URL")
            time.sleep(1)
        print(f"Prefect server: http://127.0.0.1:{port} (UI; log in {log})", flush=True)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    when = ap.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron string, e.g. "0 3 * * *" (every day at 03:00)')
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS seconds")
    ap.add_argument("--timezone", default="UTC", help="IANA timezone of the schedule (default: UTC)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a param in every run, e.g. --set gates.lam=0.1 (repeatable)")
    ap.add_argument("--name", default="cyclemerge", help="deployment name (default: cyclemerge)")
    ap.add_argument("--port", type=int, default=4200, help="port of the local Prefect server (default: 4200)")
    args = ap.parse_args(argv)
    try:
        deployment = make_deployment(name=args.name, cron=args.cron, interval=args.interval, timezone=args.timezone,
                                     params=args.params, overrides=args.overrides)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from prefect import serve

    with prefect_api(args.port):
        serve(deployment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
