"""Train a CSPNet model from a recipe: python train.py --recipe recipes/cspresnext50_ra.yaml"""
from cspx.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
