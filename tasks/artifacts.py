"""The formats of the stages' artifacts: how each is saved and read back (paths: ``Project``).

One owner for what a stage writes and the next one reads, so no task module imports another.
Every write goes through ``cyclemerge.io`` (atomic, no wall-clock fields); the wall-clock seconds of
the baselines are read back from their metrics file.
"""

from __future__ import annotations

import json
from pathlib import Path

from cyclemerge.activations import Stats, stats_from_tensors, stats_to_tensors
from cyclemerge.io import load_torch, save_torch
from cyclemerge.permutation import StateDict
from cyclemerge.results import Alignment, Baselines, Gates
from tasks.common import Project


def model_files(project: Project) -> list[Path]:
    """The models' checkpoints in index order; merging needs at least two."""
    files = sorted(project.models_dir.glob("model_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if len(files) < 2:
        raise FileNotFoundError(f"{project.models_dir}: fewer than 2 models; run the train stage first")
    return files


def load_checkpoints(project: Project) -> list[dict]:
    return [load_torch(p) for p in model_files(project)]


def load_state_dicts(project: Project) -> list[StateDict]:
    return [c["state_dict"] for c in load_checkpoints(project)]


def save_stats(project: Project, index: int, stats: dict[str, Stats], num_samples: int) -> Path:
    return save_torch({"stats": stats_to_tensors(stats), "num_samples": num_samples}, project.stats_path(index))


def load_stats(project: Project) -> list[dict[str, Stats]]:
    """Every model's activation statistics (in its own basis), indexed like the models."""
    return [stats_from_tensors(load_torch(project.stats_path(i))["stats"]) for i in range(len(model_files(project)))]


def load_correlations(project: Project) -> dict:
    if not project.correlations_path.exists():
        raise FileNotFoundError("align.cost=activations needs activations.correlations: true (no correlations.pt)")
    return load_torch(project.correlations_path)


def save_alignment(project: Project, alignment: Alignment) -> Path:
    return save_torch(alignment.to_artifact(), project.alignment_path)


def load_alignment(project: Project) -> Alignment:
    return Alignment.from_artifact(load_torch(project.alignment_path))


def save_baselines(project: Project, baselines: Baselines) -> Path:
    return save_torch(baselines.to_artifact(), project.baselines_path)


def load_baselines(project: Project) -> Baselines:
    baselines = Baselines.from_artifact(load_torch(project.baselines_path))
    metrics = project.metrics_path("baselines")
    if metrics.exists():
        timed = json.loads(metrics.read_text()).get("methods", {})
        for method, b in baselines.methods.items():
            b.seconds = timed.get(method, {}).get("seconds", b.seconds)
    return baselines


def save_gates(project: Project, gates: Gates) -> Path:
    return save_torch(gates.to_artifact(), project.gates_path)


def load_gates(project: Project) -> Gates:
    return Gates.from_artifact(load_torch(project.gates_path))


def load_merged(project: Project) -> dict:
    """The merged model's checkpoint (``cyclemerge.train.make_checkpoint`` format)."""
    return load_torch(project.merged_path)
