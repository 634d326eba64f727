"""Evaluate stage: every endpoint, the ensemble, the merged model before/after gates and repair, the
baselines, interpolation barriers and the A->B->C->A cycle; metrics, plots, report, logged model."""

from __future__ import annotations

import time

from prefect import task

from cyclemerge import evaluate as ev
from cyclemerge import matching
from cyclemerge.io import load_torch, write_json, write_text
from cyclemerge.merge import average, baseline_merges, merge_and_repair
from cyclemerge.permutation import pairwise_map
from cyclemerge.plots import plot_cycle_paths, plot_interpolation, plot_method_bars
from cyclemerge.report import params_from_config, render_summary, short_table
from cyclemerge.train import model_for
from tasks.activations import model_files
from tasks.align import alignment_path, calibration_set, load_endpoint_stats
from tasks.common import STAGE_ORDER, Project, by_key, load_stage_data, manifest
from tasks.gates import gates_path
from tasks.repair import merged_path
from tasks.tracking import attach

BASELINE_LABELS = {"naive": "naive average", "merge_many": "MergeMany", "pairwise": "pairwise to reference",
                   "c2m3": "C2M3"}


def _scores(model, sd, splits, batch_size) -> dict:
    return {name: ev.accuracy_and_loss(ev.load_into(model, sd), x, y, batch_size=batch_size)
            for name, (x, y) in splits.items()}


def _flat(scores: dict) -> dict:
    return {"test_acc": scores["test"]["acc"], "test_loss": scores["test"]["loss"],
            "train_acc": scores["train"]["acc"], "train_loss": scores["train"]["loss"]}


def cycle_maps(method: str, sds, spec, align_cfg, main_perms=None):
    """Maps a<-b, b<-c, c<-a among models 0, 1, 2 as a user of ``method`` gets them."""
    if method == "pairwise":
        pair = lambda a, b: matching.match_pair(sds[a], sds[b], spec, seed=align_cfg.seed, max_iter=align_cfg.max_iter)  # noqa: E731
        return pair(0, 1), pair(1, 2), pair(2, 0)
    perms = main_perms
    return pairwise_map(perms[0], perms[1]), pairwise_map(perms[1], perms[2]), pairwise_map(perms[2], perms[0])


@task(name="evaluate", cache_key_fn=by_key, persist_result=True)
def stage_task(project: Project, *, key: str, run_id: str | None, parent_run_id: str | None = None) -> dict:
    cfg = project.cfg
    run = attach(project, run_id)
    started = time.perf_counter()
    data = load_stage_data(project)
    model = model_for(cfg.model, data)
    spec = model.perm_spec()
    bs = cfg.evaluate.batch_size
    train_n = cfg.evaluate.train_subset or len(data.train_idx)
    tr = data.train_idx[:train_n]
    splits = {"test": (data.test_x, data.test_y), "train": (data.train_x[tr], data.train_y[tr])}

    ckpts = [load_torch(p) for p in model_files(project)]
    alignment = load_torch(alignment_path(project))
    gates = load_torch(gates_path(project))
    final = load_torch(merged_path(project))["state_dict"]
    kept = alignment["indices"]
    universe = alignment["universe"]
    sds = [ckpts[i]["state_dict"] for i in kept]

    results: dict[str, dict] = {}
    endpoint_names = []
    for i, ck in enumerate(ckpts):
        name = f"model {i}" + (f" (seed {ck['seed']})" if ck.get("seed") is not None else "")
        if i in alignment["dropped"]:
            continue
        results[name] = _scores(model, ck["state_dict"], splits, bs)
        endpoint_names.append(name)
    ens = {s: ev.ensemble_of_state_dicts(model, sds, x, y, batch_size=bs) for s, (x, y) in splits.items()}
    results["ensemble (outputs)"] = ens
    main = BASELINE_LABELS[cfg.align.method]
    uniform = average(universe)
    results[f"{main} uniform"] = _scores(model, uniform, splits, bs)
    x_cal, _ = calibration_set(data, cfg.repair.num_samples)
    stats = load_endpoint_stats(project, kept) if cfg.repair.method == "repair" else None
    if cfg.gates.enabled and cfg.repair.method != "none":
        # The paper's "C2M3 + REPAIR" (no gates); without gates it is the final model below.
        _, uniform_repaired = merge_and_repair(model, universe, method=cfg.repair.method, x=x_cal,
                                               batch_size=cfg.repair.batch_size, endpoint_stats=stats,
                                               perms=alignment["perms"], merged=uniform)
        results[f"{main} uniform + {cfg.repair.method}"] = _scores(model, uniform_repaired, splits, bs)
    if cfg.gates.enabled:
        results[f"{main} + gates"] = _scores(model, gates["merged"], splits, bs)
    final_name = f"{main}{' + gates' if cfg.gates.enabled else ' uniform'} + {cfg.repair.method}"
    if cfg.repair.method != "none":
        results[final_name] = _scores(model, final, splits, bs)
    else:
        final_name = f"{main} + gates" if cfg.gates.enabled else f"{main} uniform"

    methods = [m for m in cfg.evaluate.baselines if m in BASELINE_LABELS and m != cfg.align.method]
    baselines = baseline_merges(model, sds, methods=methods, align_config=cfg.align, repair_method=cfg.repair.method,
                                x=x_cal, batch_size=cfg.repair.batch_size, endpoint_stats=stats)
    for m, b in baselines.items():
        results[BASELINE_LABELS[m]] = _scores(model, b["merged"], splits, bs)
        if b["repaired"] is not None:
            results[f"{BASELINE_LABELS[m]} + {cfg.repair.method}"] = _scores(model, b["repaired"], splits, bs)

    rows = ev.method_table(results, endpoints=endpoint_names)
    x_test, y_test = splits["test"]
    steps = cfg.evaluate.interpolation_steps
    curves = {
        "naive (model 0 ↔ 1, own bases)": ev.interpolation_curve(model, sds[0], sds[1], x_test, y_test, steps=steps, batch_size=bs),
        f"{main} (model 0 ↔ 1, universe)": ev.interpolation_curve(model, universe[0], universe[1], x_test, y_test,
                                                                   steps=steps, batch_size=bs),
    }
    cycle = {}
    if cfg.evaluate.cycle and len(sds) >= 3:
        for method, perms in (("pairwise", None), (cfg.align.method, alignment["perms"])):
            if method == "pairwise" and cfg.align.method == "pairwise":
                continue
            maps = cycle_maps(method, sds, spec, cfg.align, perms)
            label = BASELINE_LABELS.get(method, method)
            cycle[label] = ev.cycle_experiment(model, sds[0], spec, *maps, x_test, y_test, steps=steps, batch_size=bs)

    plots = {
        "Test accuracy of every method": plot_method_bars(rows, project.plot_path("methods.png")),
        "Interpolation between two models": plot_interpolation(curves, project.plot_path("interpolation.png")),
        "Cycle A → B → C → A": plot_cycle_paths(cycle, project.plot_path("cycle.png")),
    }
    for name in ("train_curves.png", "objective.png", "gates_heatmap.png"):
        if project.plot_path(name).exists():
            plots[name.removesuffix(".png").replace("_", " ")] = project.plot_path(name)
    interp_records = [{"curve": n, "lambda": lam, "test_loss": loss, "test_acc": acc}
                      for n, c in curves.items() for lam, loss, acc in zip(c["lambdas"], c["loss"], c["acc"])]
    write_json(interp_records, project.plot_path("interpolation.json"))

    endpoints = {n: {"test_acc": results[n]["test"]["acc"], "test_loss": results[n]["test"]["loss"]} for n in endpoint_names}
    mean_acc = sum(e["test_acc"] for e in endpoints.values()) / len(endpoints)
    mean_loss = sum(e["test_loss"] for e in endpoints.values()) / len(endpoints)
    naive_scores = results.get("naive average") or _scores(model, average(sds), splits, bs)
    seconds = time.perf_counter() - started
    metrics = {
        "endpoints": {**endpoints, "mean": {"test_acc": mean_acc, "test_loss": mean_loss}},
        "ensemble": {"test_acc": ens["test"]["acc"], "test_loss": ens["test"]["loss"]},
        "merged": {"method": final_name, **{k: v for k, v in _flat(results[final_name]).items()}},
        "merged_before_repair": {"method": f"{main}{' + gates' if cfg.gates.enabled else ' uniform'}",
                                 **_flat(results[f"{main} + gates" if cfg.gates.enabled else f"{main} uniform"])},
        "uniform": _flat(results[f"{main} uniform"]),
        "naive": {"test_acc": naive_scores["test"]["acc"], "test_loss": naive_scores["test"]["loss"]},
        "methods": {r["method"]: {k: r[k] for k in ("test_acc", "test_loss", "train_acc", "train_loss")} for r in rows},
        "baselines": {m: {"objective": b["objective"], "align_seconds": b["seconds"]} for m, b in baselines.items()},
        "barriers": {n: {"barrier": c["barrier"], "acc_barrier": c["acc_barrier"]} for n, c in curves.items()},
        "cycle": {n: {k: v for k, v in c.items() if k != "curve"} for n, c in cycle.items()},
        "seconds": seconds,
        "params_hash": project.params_hash,
    }
    write_json(metrics, project.metrics_path("evaluate"))

    timings = {}
    for stage in STAGE_ORDER:
        p = project.metrics_path(stage)
        if p.exists() and stage != "evaluate":
            timings[stage] = (load_json(p).get("seconds") or 0.0)
    timings["evaluate"] = seconds
    align_metrics = load_json(project.metrics_path("align"))
    context = {
        "title": "cyclemerge run summary",
        "params": params_from_config(cfg),
        "rows": rows,
        "figures": {caption: str(p.relative_to(project.root)) for caption, p in plots.items()},
        "report_dir": "reports",
        "timings": timings,
        "alignment": {"method": cfg.align.method, "objective": align_metrics["objective"],
                      "iterations": align_metrics["iterations"], "cycle error": align_metrics["cycle_error"],
                      "cosine before": align_metrics["cosine_before"], "cosine after": align_metrics["cosine_after"]},
        "cycle": cycle,
        "notes": [f"model {i} dropped by the pre-filter" for i in alignment["dropped"]]
        + [f"model {i} entered gating switched off" for i in alignment["gate_off"]],
    }
    summary = write_text(render_summary(context), project.root / "reports" / "summary.md")
    write_text(short_table(context), project.root / "reports" / "short_table.txt")

    run.log_params({"evaluate": cfg.evaluate.model_dump()})
    run.log_metrics({f"{r['method']}.{k}": r[k] for r in rows for k in ("test_acc", "test_loss", "train_acc", "train_loss")
                     if r[k] is not None})
    run.log_metrics({"merged.test_acc": metrics["merged"]["test_acc"], "merged.test_loss": metrics["merged"]["test_loss"]})
    for p in [summary, project.metrics_path("evaluate"), *plots.values()]:
        run.log_artifact(p, "plots" if str(p).endswith(".png") else None)
    if parent_run_id:
        parent = attach(project, parent_run_id)
        parent.log_metrics({"merged.test_acc": metrics["merged"]["test_acc"], "endpoints.mean_test_acc": mean_acc,
                            "ensemble.test_acc": metrics["ensemble"]["test_acc"]})
        for p in [summary, *plots.values()]:
            parent.log_artifact(p, "plots" if str(p).endswith(".png") else None)
    model_uri = log_merged_model(project, run, model, final, x_test[:2])
    return manifest(project, [project.metrics_path("evaluate"), summary], merged=metrics["merged"], model_uri=model_uri)


def load_json(path) -> dict:
    import json

    return json.loads(path.read_text())


def log_merged_model(project: Project, run, model, state_dict, example) -> str | None:
    """The merged model in MLflow (mlflow.pytorch), registered under tracking.model_name."""
    tcfg = project.cfg.tracking
    if not run.active:
        return None
    ev.load_into(model, state_dict)
    model.eval()
    uri = run.log_model(model, "merged_model", example.numpy(), tcfg.model_name if tcfg.register_model else None)
    if uri:
        run.set_tags({"merged_model_uri": uri})
    return uri
