"""`make run`'s first step: is anything stale? Asked of DVC before torch and the rest of the stack load.

    python -m flows.uptodate    # exit 0 and the last run's table when nothing is stale, else exit 1

A rerun with nothing changed then costs DVC's own check (about half a second) instead of a pipeline
process (imports, an MLflow parent run and `dvc repro`: 7 s on the tiny test project). No MLflow
run is made for it: nothing ran. Anything but a clean ``dvc status`` (a stale stage, no dvc.lock,
no .dvc, DVC's lock held by a running repro, any error of DVC's) exits 1, so that the caller runs
the pipeline, which does the work or names the problem itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import flows._env


def up_to_date(root: Path) -> bool:
    """True when DVC finds every stage's params, code, inputs and outputs as its dvc.lock records them."""
    dvc = Path(sys.executable).with_name("dvc")
    if not ((root / ".dvc").is_dir() and (root / "dvc.lock").is_file() and dvc.is_file()):
        return False
    # --quiet: no listing, and the exit code says whether anything changed (0: nothing).
    done = subprocess.run([str(dvc), "status", "--quiet"], cwd=root, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, check=False)
    return done.returncode == 0


def main() -> int:
    root = flows._env.ROOT
    if not up_to_date(root):
        return 1
    print("Nothing to do: every stage is up to date with its params, code and inputs (dvc status).")
    table = root / "reports" / "short_table.txt"
    if table.exists():
        print("\n" + table.read_text())
    print(f"Report of that run: {root / 'reports' / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
