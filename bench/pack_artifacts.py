"""Pack a pipeline's artifacts into one small zip, to measure their CPU latency and size elsewhere.

    python bench/pack_artifacts.py RUN_ROOT OUT.zip
    python bench/pipeline_report.py OUT.zip --out DIR      # on the 2-core CPU machine

Why: the GPU machine that trains configs/pipelines/cifar10.yaml keeps nothing and returns files
of at most 16 MB, while the teacher's model.pt alone is 90 MB, yet the README's latency and size
rows must be measured on the CPU machine the tests run on.

For every artifact dir under RUN_ROOT (a dir with metrics.json), the zip holds
  model.pt          every tensor zeroed: same spec, shapes and dtypes, so the file has exactly the
                    original's size and the model it rebuilds runs exactly as fast (a dense conv's
                    time does not depend on its values); deflate shrinks the zeros ~1000x
  model_int8.pt2    the int8 package, unchanged (the real one: it is what the latency row times)
  *.json, *.yaml, *.png   metrics.json, config.yaml, plots: unchanged
and a PACKED file saying the weights are zeroed. Never packed: checkpoint.pt, W&B and submitit
folders. Accuracy cannot be measured from a packed artifact: it is in metrics.json.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import checkpoint as ckpt  # noqa: E402
from launch.collect import find_artifacts  # noqa: E402

ZEROED = ("model.pt", "head.pt")
KEPT = ("model_int8.pt2",)
KEPT_SUFFIXES = (".json", ".yaml", ".png")
NOTE = ("Packed by bench/pack_artifacts.py: every tensor in model.pt/head.pt is zeroed (same shapes, dtypes "
        "and file size); model_int8.pt2 and metrics.json are the originals.\n")


def zeroed(obj):
    """The same nested structure with every tensor replaced by zeros of its shape and dtype."""
    if isinstance(obj, torch.Tensor):
        return torch.zeros_like(obj)
    if isinstance(obj, dict):
        return {k: zeroed(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(zeroed(v) for v in obj)
    return obj


def zeroed_bytes(path: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(zeroed(ckpt.safe_load(path)), buf)
    return buf.getvalue()


def pack(run_root: Path, out: Path, allow_empty: bool = False) -> list:
    """Write the zip; returns the artifact dirs packed (relative to run_root).

    allow_empty: with no finished artifact, still write a zip (holding only the PACKED note), so a
    GPU call cut off before its first stage ended still brings back the file its caller expects.
    """
    dirs = find_artifacts([run_root]) if run_root.is_dir() else []
    if not dirs and not allow_empty:
        raise SystemExit(f"pack_artifacts: no artifact (a dir with metrics.json) under {run_root}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    packed = []
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for d in dirs:
            rel = d.relative_to(run_root)
            for f in sorted(p for p in d.iterdir() if p.is_file()):
                name = str(rel / f.name)
                if f.name in ZEROED:
                    z.writestr(name, zeroed_bytes(f))
                elif f.name in KEPT:
                    z.write(f, name, compress_type=zipfile.ZIP_STORED)  # compiled code and int8 weights
                elif f.suffix in KEPT_SUFFIXES:
                    z.write(f, name)
            z.writestr(str(rel / "PACKED"), NOTE)
            packed.append(rel)
        if not dirs:
            z.writestr("PACKED", NOTE + f"No stage had finished under {run_root}: nothing else was packed.\n")
    tmp.replace(out)
    return packed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_root", type=Path)
    parser.add_argument("out", type=Path, help="the zip to write")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write the zip (a note only) even when no stage has finished")
    args = parser.parse_args(argv)
    packed = pack(args.run_root, args.out, allow_empty=args.allow_empty)
    print(f"pack_artifacts: {len(packed)} artifacts ({', '.join(map(str, packed))}) -> {args.out} "
          f"({args.out.stat().st_size / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
