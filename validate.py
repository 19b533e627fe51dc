"""Evaluate a checkpoint: python validate.py --checkpoint PATH --data-dir /data/imagenet"""
from cspx.cli.validate import main

if __name__ == "__main__":
    raise SystemExit(main())
