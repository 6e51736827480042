"""``python -m simfl.calibrate``: tune a scenario's training settings (the CLI over :mod:`simfl.studies.calibrate`)."""

import sys

from simfl.studies.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
