"""``python -m simfl.report DIR``: the report of a run, arms or study (the CLI over :mod:`simfl.studies.report`)."""

import sys

from simfl.studies.report import main

if __name__ == "__main__":
    sys.exit(main())
