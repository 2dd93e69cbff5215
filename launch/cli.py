"""`python -m launch {submit,pipeline,sweep,status,collect,import,export}`: the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from core.errors import UserError
from launch.collect import COSTS, collect
from launch.grid import plan_sweep, write_sweep_json
from launch.jobs import STAGES, CollectJob, Planned, check_inputs, resolve
from launch.pipeline import check_shares, plan_pipeline, split_budget
from launch.status import status_lines
from launch.submission import launch

USAGE = """\
python -m launch submit STAGE CONFIG [key=value ...] [--dry-run]   one stage as one job
python -m launch pipeline CONFIG [key=value ...] [budget_min=N] [--dry-run]
                                                                   byol -> probe -> distill -> prune -> quant;
                                                                   budget_min: N minutes shared by launch.budget_share
python -m launch sweep GRID [key=value ...] [--dry-run]            a grid of overrides as one job array,
                                                                   or a pipeline's steps x seeds
python -m launch status [--run-root DIR] [--all]                   state and logs of launched jobs
python -m launch collect [RUN_ROOT | DIR ...] [--out DIR] [--cost macs|latency|size]
python -m launch import SRC name=N [format=auto] [part=auto|online|target] [run_root=runs] [overwrite=true]
                                                                   a pretrained ResNet as runs/import/N
python -m launch export ARTIFACT [format=torchvision|safetensors|onnx] [out=DIR]
                                                                   its backbone in torchvision's layout

Where jobs run is each config's `launch.cluster`: slurm, local (subprocesses, in order) or debug
(in this process). Pipeline overrides: `key=value` for every stage, `stages.<stage>.key=value` for one.
"""


def split_config(args: List[str]) -> Tuple[Optional[str], List[str]]:
    """CONFIG is the first argument unless it is already a key=value override."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _failed(manifest: Optional[dict]) -> bool:
    return bool(manifest) and any(j.get("state") in ("FAILED", "NOT_RUN") for j in manifest["jobs"])


def cmd_submit(a) -> int:
    path, overrides = split_config(a.args)
    cfg = resolve(a.stage, path, overrides)
    check_inputs(a.stage, cfg)
    manifest = launch("submit", cfg.name, [Planned(a.stage, cfg, overrides=overrides)], dry_run=a.dry_run)
    return 1 if _failed(manifest) else 0


def cmd_pipeline(a) -> int:
    path, overrides = split_config(a.args)
    if path is None:
        raise UserError("pipeline needs a pipeline file: python -m launch pipeline configs/quickstart.yaml")
    budget, overrides = split_budget(overrides)
    name, planned = plan_pipeline(path, overrides)
    if budget is not None:
        check_shares(planned, budget)
        if planned[0].cfg.launch.cluster == "slurm":  # jobs wait in a queue: each gets its share of N
            for p in planned:
                if hasattr(p.cfg, "train"):
                    p.cfg.train.budget_min = p.cfg.launch.budget_share * budget
                    p.overrides.append(f"train.budget_min={p.cfg.train.budget_min:g}")
    table = Path(planned[0].cfg.run_root) / "collect" / name
    manifest = launch("pipeline", name, planned, stop_on_failure=True, dry_run=a.dry_run,
                      budget_min=budget if budget is not None and planned[0].cfg.launch.cluster != "slurm" else None,
                      collect_to=table)
    if manifest and manifest["cluster"] != "slurm":  # what the SLURM collect job does, here
        CollectJob(planned[0].cfg.run_root, [p.run_dir for p in planned], table)()
    return 1 if _failed(manifest) else 0


def cmd_sweep(a) -> int:
    path, overrides = split_config(a.args)
    if path is None:
        raise UserError("sweep needs a grid file: python -m launch sweep configs/ablations/<grid>.yaml")
    spec, planned = plan_sweep(path, overrides)
    written = []

    def record_sweep(record: Path) -> None:
        written.append(write_sweep_json(spec, planned, str(record)))

    # One stage: one job array. A pipeline sweep: each seed's pipeline, chained (afterok).
    one_stage = bool(spec["stage"])
    table = Path(planned[0].cfg.run_root) / "collect" / spec["name"]
    manifest = launch("sweep", spec["name"], planned, array=one_stage, stop_on_failure=False, dry_run=a.dry_run,
                      extra={"sweep": spec["name"]}, on_record=record_sweep, collect_to=table)
    if written:
        kind = "variants" if one_stage else "steps"
        print(f"sweep {spec['name']}: {len(planned)} runs ({len(spec['variants'])} {kind} x "
              f"{len(spec['seeds'])} seeds); manifest {written[0]}")
    if manifest and manifest["cluster"] != "slurm":
        CollectJob(planned[0].cfg.run_root, [p.run_dir for p in planned], table)()
    return 1 if _failed(manifest) else 0


def cmd_status(a) -> int:
    print("\n".join(status_lines(a.run_root, a.all)))
    return 0


def cmd_collect(a) -> int:
    print(collect(a.paths, a.out, a.cost))
    return 0


def key_values(args: List[str], allowed: Tuple[str, ...], command: str) -> dict:
    out = {}
    for a in args:
        key, eq, value = a.partition("=")
        if not eq or key not in allowed:
            raise UserError(f"{command}: unexpected argument {a!r}; it takes {', '.join(k + '=...' for k in allowed)}")
        out[key] = value
    return out


def cmd_import(a) -> int:
    from core import portable, rundir

    opts = key_values(a.args, ("name", "format", "part", "run_root", "overwrite"), "import")
    if not opts.get("name"):
        raise UserError("import needs name=N (the artifact becomes <run_root>/import/N)")
    run_dir = Path(opts.get("run_root", "runs")) / "import" / opts["name"]
    old = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else None
    if old is not None and opts.get("overwrite", "false").lower() != "true":
        raise UserError(f"{run_dir} already holds an import of {old.get('source')} (sha256 {old.get('sha256', '')[:12]}); "
                        f"use another name= or overwrite=true")
    rundir.hold(run_dir)
    out, said = portable.import_backbone(Path(a.src), run_dir, opts["name"], opts.get("format", "auto"),
                                         opts.get("part", "auto"))
    print(f"import: {a.src}: {said} -> {out}")
    return 0


def cmd_export(a) -> int:
    from core import portable

    opts = key_values(a.args, ("format", "out"), "export")
    for path in portable.export_backbone(Path(a.artifact), opts.get("format", "torchvision"), opts.get("out")):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch", usage=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="one stage as one job")
    p.add_argument("stage", choices=STAGES, metavar="STAGE")
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and config; submit nothing")
    p.set_defaults(func=cmd_submit)
    for name, func, help_ in (("pipeline", cmd_pipeline, "a pipeline file's stages, chained"),
                              ("sweep", cmd_sweep, "a grid file as one job array")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("args", nargs="*", metavar="FILE|key=value")
        p.add_argument("--dry-run", action="store_true", help="print the sbatch scripts and configs; submit nothing")
        p.set_defaults(func=func)
    p = sub.add_parser("status", help="state and logs of the jobs launched")
    p.add_argument("--run-root", default=None, help="default: runs/ here or in a folder above, or the run root you are in")
    p.add_argument("--all", action="store_true", help="every launch, not only the latest")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("collect", help="metrics of artifact dirs as tables and a Pareto plot")
    p.add_argument("paths", nargs="*", metavar="RUN_ROOT|DIR")
    p.add_argument("--out", default=None, help="default: <RUN_ROOT>/collect")
    p.add_argument("--cost", choices=sorted(COSTS), default="macs")
    p.set_defaults(func=cmd_collect)
    p = sub.add_parser("import", help="a pretrained ResNet checkpoint as an artifact")
    p.add_argument("src", metavar="SRC")
    p.add_argument("args", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("export", help="an artifact's backbone in torchvision's layout, or as ONNX")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("args", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if argv else 2
    if argv[0] == "submit" and len(argv) > 1 and argv[1] not in STAGES and not argv[1].startswith("-"):
        print(f"error: unknown stage {argv[1]!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    # --dry-run may stand anywhere among the overrides (argparse's subparsers cannot intermix).
    dry_run = "--dry-run" in argv
    args = parser.parse_args([a for a in argv if a != "--dry-run"])
    args.dry_run = dry_run
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: Slurm jobs already submitted keep running (python -m launch status); a local job "
              "was stopped, and rerunning the same command resumes it from its checkpoint", file=sys.stderr)
        return 130
