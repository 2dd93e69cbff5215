"""`python -m launch collect [RUN_ROOT or artifact dirs] [--out DIR] [--cost macs|latency|size]`.

Reads artifact directories alone (metrics.json + config.yaml; `<run_root>/sweeps/*/sweep.json`
when there is one) and writes:

    results.md    the runs table and the per-variant table (mean ± std over seeds, n, and each
                  variant's top-1 against the best of its cohort, "n.s." within the spread)
    runs.csv      one row per run, raw numbers
    groups.csv    one row per variant: <metric>_mean, <metric>_std, n
    pareto_<cost>.png   probe top-1 against cost (MACs, CPU latency at batch 1, or file size);
                        the Pareto front (no other point is both cheaper and more accurate) in red

A variant is a sweep's `<sweep>-<variant>`; without sweep.json, runs named `<x>-s<seed>`
(their config's seed) are grouped as `<x>`, so seeds of a hand-made ablation average too.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from core.errors import UserError

COLUMNS = ["run", "stage", "arch", "probe_top1", "probe_top5", "knn_top1", "linear_top1", "finetune_top1",
           "test_probe_top1", "test_probe_top5", "test_knn_top1", "test_linear_top1", "test_finetune_top1",
           "params", "macs", "file_mb", "latency_ms_cpu_b1", "latency_ms_cpu_b32", "cka_teacher", "seconds_per_epoch"]
METRICS = COLUMNS[3:]
ACCURACIES = ("probe_top1", "probe_top5", "knn_top1", "linear_top1", "finetune_top1")
# Headers of the Markdown tables, each accuracy with the split it was measured on: val (carved
# from train, what every decision uses) or test (data.test / data.test_root; never used to decide).
# The CSVs keep the metric names, for scripts.
LABELS = {**{m: f"val {label}" for m, label in zip(ACCURACIES, ("probe top-1", "top-5", "kNN top-1", "linear top-1",
                                                                  "fine-tune top-1"))},
          **{f"test_{m}": f"test {label}" for m, label in zip(ACCURACIES, ("probe top-1", "top-5", "kNN top-1",
                                                                            "linear top-1", "fine-tune top-1"))},
          "params": "params", "macs": "MACs", "file_mb": "file MB", "latency_ms_cpu_b1": "CPU ms b1",
          "latency_ms_cpu_b32": "CPU ms b32", "cka_teacher": "CKA", "seconds_per_epoch": "s/epoch"}
ACCURACY = "probe_top1"
COSTS = {"macs": ("macs", "MACs"), "latency": ("latency_ms_cpu_b1", "CPU latency, batch 1 (ms)"),
         "size": ("file_mb", "model file (MB)")}


# ----------------------------------------------------------------------------- reading


def find_artifacts(paths: Sequence[str | Path]) -> List[Path]:
    """Every directory holding a metrics.json at or under `paths` (not looking inside one)."""
    found = []
    for root in paths:
        root = Path(root)
        if (root / "metrics.json").is_file():
            found.append(root)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            if "metrics.json" in filenames:
                found.append(Path(dirpath))
                dirnames[:] = []
            else:
                dirnames[:] = sorted(d for d in dirnames if d not in ("wandb", "submitit", "launch"))
    return sorted(dict.fromkeys(found))


def sweep_index(paths: Sequence[str | Path]) -> Dict[Path, dict]:
    """resolved run dir -> {sweep, variant, overrides} from every sweep.json under `paths`."""
    index = {}
    for root in paths:
        for path in Path(root).glob("sweeps/*/sweep.json"):
            sweep = json.loads(path.read_text())
            for run in sweep.get("runs", []):
                index[Path(run["run_dir"]).resolve()] = {
                    "sweep": sweep["sweep"], "variant": run["variant"],
                    "overrides": " ".join(sweep.get("variants", {}).get(run["variant"], [])),
                    "compared": run["variant"] in sweep.get("compare", [])}
    return index


def read_run(run_dir: Path, sweeps: Dict[Path, dict]) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = {}
    if (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    stage = metrics.get("stage") or run_dir.parent.name
    name = config.get("name", run_dir.name)
    arch = metrics.get("arch") or (config.get("model") or {}).get("arch", "")
    source = Path(str(metrics.get("source", "")))
    if not arch and (source / "metrics.json").is_file():  # probe: the arch of what it probed
        arch = json.loads((source / "metrics.json").read_text()).get("arch", "")
    row = {"run": f"{run_dir.parent.name}/{run_dir.name}", "stage": stage, "arch": arch,
           "dir": str(run_dir), "seed": config.get("seed"), "test_split": metrics.get("test_split")}
    row.update({m: metrics.get(m) for m in METRICS})
    sweep = sweeps.get(run_dir.resolve())
    # The cohort: groups whose accuracies are compared (collect's "vs best" column).
    row["cohort"] = stage
    if sweep is not None:
        row["group"], row["overrides"] = f"{sweep['sweep']}-{sweep['variant']}", sweep["overrides"]
        row["cohort"] = f"{sweep['sweep']}: " + ("compared steps" if sweep["compared"] else stage)
    elif row["seed"] is not None and str(name).endswith(f"-s{row['seed']}"):
        row["group"], row["overrides"] = str(name)[: -len(f"-s{row['seed']}")], ""
    else:
        row["group"], row["overrides"] = str(name), ""
    return row


def onnx_row(row: dict, run_dir: Path) -> Optional[dict]:
    """quant's model_int8.onnx as a row of its own, like any other run: ONNX Runtime's top-1,
    latency and file size from metrics.json's onnx_* keys (#22); None without an ONNX file."""
    m = json.loads((run_dir / "metrics.json").read_text())
    if m.get("onnx_top1") is None:
        return None
    return {**row, **{k: None for k in METRICS}, "run": f"{row['run']} (onnx)", "group": f"{row['group']} (onnx)",
            "probe_top1": m["onnx_top1"], "probe_top5": m["onnx_top5"], "params": row["params"], "macs": row["macs"],
            "file_mb": m["onnx_file_mb"], "latency_ms_cpu_b1": m["onnx_latency_ms_cpu_b1"],
            "latency_ms_cpu_b32": m["onnx_latency_ms_cpu_b32"]}


# ----------------------------------------------------------------------------- grouping


def mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n-1); std is 0 for one value, None for none."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def group_runs(rows: Sequence[dict]) -> List[dict]:
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for row in rows:
        groups.setdefault((row["stage"], row["group"]), []).append(row)
    out = []
    for (stage, group), members in groups.items():
        g = {"group": group, "stage": stage, "arch": members[0]["arch"], "n": len(members),
             "overrides": members[0]["overrides"], "runs": [m["run"] for m in members],
             "cohort": members[0].get("cohort", stage)}
        for m in METRICS:
            g[f"{m}_mean"], g[f"{m}_std"] = mean_std([r[m] for r in members])
        out.append(g)
    mark_significance(out)
    return out


def mark_significance(groups: Sequence[dict], metric: str = ACCURACY) -> None:
    """g["vs_best"]: each group's difference in `metric` from the best group of its cohort (a
    sweep's variants of one stage, or its `compare:` steps), "n.s." (not significant) when
    smaller than the spread sqrt(std_a^2 + std_b^2) over seeds; one seed has no spread to judge by."""
    cohorts: Dict[str, List[dict]] = {}
    for g in groups:
        g["vs_best"] = ""
        if g[f"{metric}_mean"] is not None:
            cohorts.setdefault(g["cohort"], []).append(g)
    for members in cohorts.values():
        if len(members) < 2:
            continue
        best = max(members, key=lambda g: g[f"{metric}_mean"])
        for g in members:
            if g is best:
                g["vs_best"] = "best"
                continue
            diff = g[f"{metric}_mean"] - best[f"{metric}_mean"]
            if min(g["n"], best["n"]) < 2:
                g["vs_best"] = f"{diff:+.4f} (1 seed: no spread)"
                continue
            spread = math.sqrt(g[f"{metric}_std"] ** 2 + best[f"{metric}_std"] ** 2)
            g["vs_best"] = f"{diff:+.4f} n.s." if abs(diff) <= spread else f"{diff:+.4f}"


# ----------------------------------------------------------------------------- formatting


def fmt(metric: str, value) -> str:
    if value is None or value == "":
        return "–"
    if not isinstance(value, (int, float)):
        return str(value)
    if metric.removeprefix("test_") in ACCURACIES or metric == "cka_teacher":
        return f"{value:.4f}"
    if metric == "params":
        return f"{value / 1e6:.2f}M"
    if metric == "macs":
        return f"{value / 1e9:.2f}G" if value >= 1e9 else f"{value / 1e6:.1f}M"
    if metric == "seconds_per_epoch":
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def shown_metrics(rows: Sequence[dict], suffix: str = "") -> List[str]:
    """The metric columns at least one row has (no column of dashes for a stage that did not run)."""
    return [m for m in METRICS if any(r.get(m + suffix) not in (None, "") for r in rows)]


def runs_table(rows: Sequence[dict]) -> str:
    metrics = shown_metrics(rows)
    columns = COLUMNS[:3] + metrics
    return markdown([LABELS.get(c, c) for c in columns],
                    [[fmt(c, r.get(c)) if c in METRICS else r.get(c, "") for c in columns] for r in rows])


def groups_table(groups: Sequence[dict]) -> str:
    metrics = shown_metrics(groups, "_mean")
    headers = ["group", "stage", "arch", "n", *(LABELS[m] for m in metrics), f"{LABELS[ACCURACY]} vs best", "overrides"]
    body = []
    for g in groups:
        cells = [g["group"], g["stage"], g["arch"], g["n"]]
        for m in metrics:
            mean, std = g[f"{m}_mean"], g[f"{m}_std"]
            cells.append(fmt(m, mean) if mean is None or g["n"] == 1 else f"{fmt(m, mean)} ± {fmt(m, std)}")
        cells += [g["vs_best"], g["overrides"] or ""]
        body.append(cells)
    return markdown(headers, body)


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(headers), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({h: "" if row.get(h) is None else row.get(h) for h in headers})


# ----------------------------------------------------------------------------- Pareto


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indexes of the (cost, accuracy) points no other point dominates (cheaper-or-equal and
    at-least-as-accurate, better in one), sorted by cost."""
    front = []
    for i, (c, a) in enumerate(points):
        dominated = any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def plot_pareto(groups: Sequence[dict], cost: str, path: Path) -> Optional[Path]:
    """Accuracy against cost, one point per variant (mean over seeds, std as error bar)."""
    metric, label = COSTS[cost]
    shown = [g for g in groups if g[f"{ACCURACY}_mean"] is not None and g[f"{metric}_mean"] is not None]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(g[f"{metric}_mean"], g[f"{ACCURACY}_mean"]) for g in shown]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for stage in dict.fromkeys(g["stage"] for g in shown):
        idx = [i for i, g in enumerate(shown) if g["stage"] == stage]
        ax.errorbar([points[i][0] for i in idx], [points[i][1] for i in idx],
                    yerr=[shown[i][f"{ACCURACY}_std"] or 0 for i in idx], fmt="o", capsize=3, label=stage, alpha=0.8)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "-", color="red", lw=1.5,
            label="Pareto front", zorder=0)
    ax.scatter([points[i][0] for i in front], [points[i][1] for i in front], s=120, facecolors="none",
               edgecolors="red", zorder=3)
    for (x, y), g in zip(points, shown):
        ax.annotate(g["group"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    costs = [p[0] for p in points]
    if min(costs) > 0 and max(costs) / min(costs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"{label} (lower is better)")
    ax.set_ylabel("linear probe top-1")
    ax.set_title(f"accuracy vs {cost}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- command


def collect(paths: Sequence[str | Path], out: Optional[str | Path] = None, cost: str = "macs",
            only: Optional[Sequence[str | Path]] = None) -> str:
    """Writes results.md, runs.csv, groups.csv and the Pareto plot to `out`; returns the Markdown.
    only: keep just these artifact dirs (a sweep's own runs, found under its run root)."""
    paths = [Path(p) for p in paths] or [Path("runs")]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(f"collect: no such directory: {', '.join(missing)}")
    sweeps = sweep_index(paths)
    found = find_artifacts(paths)
    if only is not None:
        keep = {Path(p).resolve() for p in only}
        found = [d for d in found if d.resolve() in keep]
    rows = [read_run(d, sweeps) for d in found]
    rows += [r for r in (onnx_row(row, d) for row, d in zip(list(rows), found)) if r is not None]
    if out is None:  # <run_root>/collect, for a run root or one of its artifacts (<run_root>/<stage>/<name>)
        out = (paths[0].parent.parent if (paths[0] / "metrics.json").is_file() else paths[0]) / "collect"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(rows)
    text = [f"## Runs ({len(rows)})", "", runs_table(rows)]
    tests = sorted({r["test_split"] for r in rows if r.get("test_split")})
    if tests:  # which images the test columns are on
        text += ["", f"test columns: {'; '.join(tests)}"]
    if any(g["n"] > 1 or g["overrides"] for g in groups):
        text += ["", "## Variants (mean ± std over seeds)", "", groups_table(groups)]
    plot = plot_pareto(groups, cost, out / f"pareto_{cost}.png")
    text += ["", f"Pareto plot: {plot}" if plot else f"(no run has both {ACCURACY} and {COSTS[cost][0]}: no plot)"]
    markdown_text = "\n".join(text)
    (out / "results.md").write_text(markdown_text + "\n")
    write_csv(out / "runs.csv", COLUMNS + ["group", "seed", "dir"], rows)
    write_csv(out / "groups.csv", ["group", "stage", "arch", "n"]
              + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")] + ["vs_best", "overrides"], groups)
    return markdown_text
