"""The command line of train.py and `cspx-train`: `--recipe R.yaml [section.key=value ...]`."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from cspx.errors import run_cli

EPILOG = """\
overrides are dotted recipe keys parsed as YAML scalars, e.g.
  train.steps=1000 optim.lr=0.2 data.root=/data/imagenet model.init_from=null
long runs: always pass --resume auto; it continues from the newest valid checkpoint in run.dir
(or starts fresh), so the same command restarts a run after preemption.
multi-GPU: torchrun --nproc_per_node=8 train.py --recipe R.yaml --resume auto (docs/distributed.md)
"""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description="Train a CSPNet model from a recipe.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe YAML (see recipes/ and docs/recipes.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument("--resume", metavar="auto|PATH", help="continue a run: 'auto' = newest valid "
                   "checkpoint in run.dir (fresh start if none), or a checkpoint file")
    p.add_argument("--resume-force", action="store_true",
                   help="resume even if training-relevant recipe keys or the data changed")
    p.add_argument("--dry-run", action="store_true", help="check recipe and data, print the plan")
    p.add_argument("--verbose", action="store_true", help="tracebacks and debug logging")
    return p.parse_args(argv)


def _main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    from cspx.config import load_config  # after argparse, so --help is instant
    from cspx.train_setup import train
    cfg = load_config(args.recipe, args.overrides)
    return train(cfg, resume=args.resume, force=args.resume_force, dry_run=args.dry_run,
                 verbose=args.verbose)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
