"""An ImageNet-shaped ImageFolder from a folder of small images: each upscaled to SIZE x SIZE.

    python bench/make_imagenet_shaped.py ../shared/data/cifar10/train /tmp/imagenet-shaped --size 256 --per-class 1300

For the 224 px throughput benchmark (bench/byol_throughput.py --imagefolder-224): JPEG files
of ImageNet's typical size, so reading, decoding and resizing cost what they cost on
ImageNet. The first N images (sorted) of each class folder are resized with PIL's bicubic
filter and saved as JPEG, quality 90, as DST/<class>/<name>.JPEG. Files already there are
kept, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data import scan_image_folder  # noqa: E402


def convert(job) -> int:
    src, dst, size, quality = job
    if dst.is_file():
        return 0
    from PIL import Image

    with Image.open(src) as im:
        out = im.convert("RGB").resize((size, size), Image.BICUBIC)
    tmp = dst.with_name(f".{dst.name}.tmp")
    out.save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, dst)  # never a half-written file under the final name
    return 1


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="ImageFolder root (class folders of images)")
    parser.add_argument("dst", type=Path)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--per-class", type=int, default=1300, help="images per class (ImageNet has ~1,300)")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    paths, labels, classes = scan_image_folder(args.src)
    jobs, taken = [], {}
    for path, label in zip(paths, labels):
        if taken.get(label, 0) < args.per_class:
            taken[label] = taken.get(label, 0) + 1
            out = args.dst / classes[label] / (path.stem + ".JPEG")
            jobs.append((path, out, args.size, args.quality))
    for c in classes:
        (args.dst / c).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        written = sum(pool.map(convert, jobs, chunksize=64))
    size_mb = sum(out.stat().st_size for _, out, _, _ in jobs) / 2**20
    print(f"{args.dst}: {len(jobs)} images ({written} written now) in {len(classes)} classes, "
          f"{args.size}x{args.size} JPEG q{args.quality}, {size_mb:.0f} MiB")


if __name__ == "__main__":
    main()
