"""The one `main` every stage's `python -m STAGE CONFIG [key=value ...]` goes through."""

from __future__ import annotations

import sys
from typing import Callable, List, Optional

from core.config import load_config
from core.errors import UserError


def stage_main(stage: str, schema, run: Callable, argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m {stage} CONFIG.yaml [key=value ...]\n"
              f"  runs the {stage} stage; artifacts go to <run_root>/{stage}/<name>/", file=sys.stderr)
        return 0 if argv else 2
    path, overrides = (None, argv) if "=" in argv[0] else (argv[0], argv[1:])
    try:
        cfg = load_config(schema, path, overrides, stage=stage)
        out = run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is intact; rerun the same command to resume", file=sys.stderr)
        return 130
    print(out)
    return 0
