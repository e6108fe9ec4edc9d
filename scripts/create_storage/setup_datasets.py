"""Seed-compatible entry point: ``python scripts/create_storage/setup_datasets.py --datasets ... --steps ...``."""

import sys

from weighted_mtp.cli import add_dataset_args, dispatch, run_datasets

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="setup_datasets.py", description=__doc__)
    add_dataset_args(parser)
    sys.exit(dispatch(run_datasets, parser.parse_args(), "setup_datasets.py"))
