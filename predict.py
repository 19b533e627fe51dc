"""Classify images with a checkpoint: python predict.py --checkpoint PATH photos/ --out preds.csv"""
from cspx.cli.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
