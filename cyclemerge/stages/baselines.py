"""Baselines stage: the other alignment methods of ``evaluate.baselines``, each aligned once and merged
uniformly in its universe, before and after repair; and the pairwise maps of the cycle experiment.

They depend on the models, their statistics and the params only, never on the main alignment, so
they are computed once per change of those and the evaluate stage only scores them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from cyclemerge.activations import Stats
from cyclemerge.config import MATCHERS, Config
from cyclemerge.permutation import StateDict
from cyclemerge.results import Baseline, Baselines
from cyclemerge.stages.align import screen
from cyclemerge.stages.repair import merge_and_repair
from cyclemerge.universe import alignment_objective, match_models, match_pair_models, spec_of, to_universe_all


def baseline_methods(config: Config) -> list[str]:
    """The methods of ``evaluate.baselines`` to align, in order: all but the ensemble (scored by the
    evaluate stage, not aligned) and the main method."""
    return [m for m in config.evaluate.baselines if m in MATCHERS and m != config.align.method]


def wants_cycle_maps(config: Config, num_models: int) -> bool:
    return config.evaluate.cycle and num_models >= 3


def baselines(state_dicts: Sequence[StateDict], model: nn.Module, config: Config, *,
              endpoint_stats: Sequence[dict[str, Stats]] | None, x: torch.Tensor) -> Baselines:
    """Every baseline over the models the pre-filter keeps (as the align stage keeps them).

    ``endpoint_stats`` (every input model's) are needed for ``repair.method: repair``; ``x`` is the
    calibration slice (its first ``repair.num_samples`` are used).
    """
    kept = screen(state_dicts, config, quiet=True).kept
    sds = [state_dicts[i] for i in kept]
    stats = None if endpoint_stats is None else [endpoint_stats[i] for i in kept]
    x = x[:config.repair.num_samples]
    spec = spec_of(model)
    methods = baseline_methods(config)

    def aligned(method: str):
        start = time.perf_counter()
        result = match_models(state_dicts=list(sds), spec=spec,
                              config=config.align.model_copy(update={"method": method, "restarts": 1}))
        return result, time.perf_counter() - start

    def pair(a: int, b: int):
        return match_pair_models(sds[a], sds[b], spec, seed=config.align.seed, max_iter=config.align.max_iter)

    # The alignments are independent pure functions of the state dicts, mostly LAPs (which release the
    # GIL): side by side they keep both cores busy. Merging and repair share ``model``, so they stay serial.
    with ThreadPoolExecutor(max_workers=max(1, min(2, torch.get_num_threads()))) as pool:
        matched = {m: pool.submit(aligned, m) for m in methods}
        cycle_jobs = [pool.submit(pair, a, b) for a, b in ((0, 1), (1, 2), (2, 0))] \
            if wants_cycle_maps(config, len(sds)) else []
        out: dict[str, Baseline] = {}
        for method, job in matched.items():
            result, seconds = job.result()
            universe = to_universe_all(sds, spec, result.perms)
            merged, repaired = merge_and_repair(model, universe, method=config.repair.method, x=x,
                                                batch_size=config.repair.batch_size, endpoint_stats=stats,
                                                perms=result.perms)
            out[method] = Baseline(method=method, perms=result.perms, merged=merged,
                                   repaired=None if config.repair.method == "none" else repaired,
                                   objective=alignment_objective(sds, spec, result.perms), seconds=seconds,
                                   report=result.report.summary())
        cycle = tuple(job.result() for job in cycle_jobs) if cycle_jobs else None
    return Baselines(indices=kept, methods=out, cycle_maps=cycle)
