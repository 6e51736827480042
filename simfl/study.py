"""``python -m simfl.study``: run a study and write its report (the command line over :mod:`simfl.studies.study`)."""

import sys

from simfl.studies.study import main

if __name__ == "__main__":
    sys.exit(main())
