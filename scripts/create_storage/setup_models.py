"""Seed-compatible entry point: ``python scripts/create_storage/setup_models.py --model ... --steps ...``."""

import sys

from weighted_mtp.cli import add_model_args, dispatch, run_models

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="setup_models.py", description=__doc__)
    add_model_args(parser)
    sys.exit(dispatch(run_models, parser.parse_args(), "setup_models.py"))
