"""The results table, Pareto plot and targets of a compression pipeline, with CPU latency and
file size measured here, from the artifact files.

    python bench/pipeline_report.py runs --out bench/results/cifar10
    python bench/pipeline_report.py bench/results/cifar10-artifacts.zip --out bench/results/cifar10

The input is a pipeline's run root (`python -m launch pipeline ...`) or bench/pack_artifacts.py's
zip of one (unpacked into OUT/artifacts; its weights are zeroed, which changes neither the file
sizes nor the timings). One row per model, in pipeline order: teacher (byol), student (distill),
pruned (prune), int8 (quant). Accuracies, params, MACs and GPU seconds per epoch come from each
artifact's metrics.json (written where it trained); CPU latency (median, batch 1 and 32, random
32px inputs) and file size are measured here by bench/latency_artifacts.py: model.pt for the
fp32 models, the AOTInductor package model_int8.pt2 for the int8 one; every model once per round,
in `--rounds` interleaved rounds, the median round reported (all rounds in report.json). Writes to OUT:

    table.md              the README table (+ the targets below, checked)
    report.json           the same numbers, and the machine they were measured on
    pareto_latency.png    probe top-1 against CPU latency at batch 1; the Pareto front in red
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency_artifacts import measure_rounds  # noqa: E402

from launch import collect as collect_mod  # noqa: E402

ROLES = {"byol": "teacher (fp32)", "distill": "student (fp32)", "prune": "pruned (fp32)", "quant": "int8"}
COLUMNS = [("model", None), ("run", None), ("arch", None), ("val probe top-1", "probe_top1"),
           ("val probe top-5", "probe_top5"), ("val kNN top-1", "knn_top1"), ("test probe top-1", "test_probe_top1"),
           ("test probe top-5", "test_probe_top5"), ("test kNN top-1", "test_knn_top1"), ("params", "params"), ("MACs", "macs"), ("file MB", "file_mb"),
           ("CPU ms b1", "latency_ms_cpu_b1"), ("CPU ms b32", "latency_ms_cpu_b32"),
           ("train s/epoch", "seconds_per_epoch")]


def targets(rows: dict) -> list:
    """(what, value, passed) for the targets of configs/pipelines/cifar10.yaml's study; None = not measurable."""
    t, s, p, q = (rows.get(k) for k in ("byol", "distill", "prune", "quant"))

    def check(what, fn, needs):
        if any(r is None for r in needs):
            return (what, "no such run", None)
        value, passed = fn()
        return (what, value, passed)

    return [
        check("teacher probe top-1 >= 0.85", lambda: (f"{t['probe_top1']:.4f}", t["probe_top1"] >= 0.85), [t]),
        check("student >= teacher - 2 points", lambda: (f"{100 * (s['probe_top1'] - t['probe_top1']):+.2f} points",
                                                          s["probe_top1"] >= t["probe_top1"] - 0.02), [t, s]),
        check("pruned MACs <= 50% of the student's", lambda: (f"{p['macs'] / s['macs']:.3f}",
                                                               p["macs"] <= 0.5 * s["macs"]), [s, p]),
        check("pruned >= student - 1 point", lambda: (f"{100 * (p['probe_top1'] - s['probe_top1']):+.2f} points",
                                                       p["probe_top1"] >= s["probe_top1"] - 0.01), [s, p]),
        check("int8 >= pruned - 0.5 point", lambda: (f"{100 * (q['probe_top1'] - p['probe_top1']):+.2f} points",
                                                      q["probe_top1"] >= p["probe_top1"] - 0.005), [p, q]),
        check("int8 file >= 20x smaller than the teacher's", lambda: (f"{t['file_mb'] / q['file_mb']:.1f}x",
                                                                       t["file_mb"] >= 20 * q["file_mb"]), [t, q]),
        check("int8 CPU batch-1 latency >= 15x lower than the teacher's",
              lambda: (f"{t['latency_ms_cpu_b1'] / q['latency_ms_cpu_b1']:.1f}x",
                       t["latency_ms_cpu_b1"] >= 15 * q["latency_ms_cpu_b1"]), [t, q]),
    ]


def unpack(source: Path, out: Path) -> Path:
    if source.is_dir():
        return source
    if not zipfile.is_zipfile(source):
        raise SystemExit(f"pipeline_report: {source} is neither a run root nor a zip from bench/pack_artifacts.py")
    root = out / "artifacts"
    with zipfile.ZipFile(source) as z:
        z.extractall(root)
    return root


def measure_rows(dirs: dict, rows: dict, iters: int, warmup: int, rounds: int) -> None:
    """CPU latency and file size of each model as it ships: the int8 package where there is one."""
    for (stage, d), m in zip(dirs.items(), measure_rounds(list(dirs.values()), iters, warmup, rounds)):
        kind = "int8" if "int8_b1" in m else "fp32"
        rows[stage].update(kind=kind, file_mb=m[f"{kind}_mb"], latency_ms_cpu_b1=m[f"{kind}_b1"],
                           latency_ms_cpu_b32=m[f"{kind}_b32"], latency_rounds_b1=m["rounds"][f"{kind}_b1"],
                           latency_rounds_b32=m["rounds"][f"{kind}_b32"])
        print(f"pipeline_report: {rows[stage]['run']}: {kind} " + ", ".join(
            f"batch {b}: {' / '.join(f'{v:.2f}' for v in m['rounds'][f'{kind}_b{b}'])} ms" for b in (1, 32)), flush=True)


def report(source: Path, out: Path, iters: int = 20, warmup: int = 5, rounds: int = 3, name: str = "") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    root = unpack(source, out)
    rows, dirs = {}, {}
    for d in collect_mod.find_artifacts([root]):
        row = collect_mod.read_run(d, {})
        if row["stage"] not in ROLES or (name and d.name != name):
            continue  # the probe stage: the teacher's own probe_top1 is the byol row's
        if row["stage"] in rows:
            raise SystemExit(f"pipeline_report: two {row['stage']} runs under {root} ({rows[row['stage']]['run']}, "
                             f"{row['run']}): point it at one pipeline's run root, or pick one with --name")
        row["model"] = ROLES[row["stage"]]
        rows[row["stage"]], dirs[row["stage"]] = row, d
    if not rows:
        raise SystemExit(f"pipeline_report: no byol/distill/prune/quant artifact under {root}")
    measure_rows(dirs, rows, iters, warmup, rounds)
    ordered = [rows[s] for s in ROLES if s in rows]
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    # The test columns only where a run measured them (data.test / data.test_root; val only otherwise).
    columns = [(c, k) for c, k in COLUMNS if k is None or not k.startswith("test_") or any(r.get(k) for r in ordered)]
    table = collect_mod.markdown([c for c, _ in columns], [
        [r["model"], r["run"], r["arch"]] + [collect_mod.fmt(k, r.get(k)) for _, k in columns[3:]] for r in ordered])
    checks = targets(rows)
    check_table = collect_mod.markdown(["target", "value", "met"], [
        [what, value, {True: "yes", False: "NO", None: "–"}[passed]] for what, value, passed in checks])
    for r in ordered:
        r["group"] = r["model"]  # the Pareto plot labels each point with its group
    plot = collect_mod.plot_pareto(collect_mod.group_runs(ordered), "latency", out / "pareto_latency.png")
    tests = sorted({r["test_split"] for r in ordered if r.get("test_split")})
    text = (f"CPU latency and file size measured here ({machine}) from the artifact files; accuracies "
            f"and GPU s/epoch from metrics.json"
            + (f"; test columns on {'; '.join(tests)}" if tests else "; no test split configured (val only)")
            + f".\n\n{table}\n\n{check_table}\n")
    (out / "table.md").write_text(text)
    result = {"machine": machine, "rows": ordered, "targets": [list(c) for c in checks],
              "plot": str(plot) if plot else None}
    (out / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print("\n" + text + (f"\nPareto plot: {plot}" if plot else ""))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a pipeline's run root, or bench/pack_artifacts.py's zip")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--name", default="", help="only the artifacts of this run name (runs/<stage>/NAME)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report(args.source, args.out, args.iters, args.warmup, args.rounds, args.name)


if __name__ == "__main__":
    main()
