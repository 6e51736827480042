"""``python -m simfl.run``: run one scenario (the command line over :mod:`simfl.simulation.runner`)."""

import sys

from simfl.simulation.runner import main

if __name__ == "__main__":
    sys.exit(main())
