"""Seed-compatible entry point: ``python scripts/create_storage/verify_storage.py --check ...``."""

import sys

from weighted_mtp.cli import add_verify_args, dispatch, run_verify

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="verify_storage.py", description=__doc__)
    add_verify_args(parser)
    sys.exit(dispatch(run_verify, parser.parse_args(), "verify_storage.py"))
