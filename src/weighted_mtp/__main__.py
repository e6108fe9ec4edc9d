import sys

from weighted_mtp.cli import main

sys.exit(main())
