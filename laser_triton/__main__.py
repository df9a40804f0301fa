"""`python -m laser_triton ...`: the same as the `laser-triton` console script."""

import sys

from laser_triton.tools.cli import main

if __name__ == "__main__":  # importing it (pkgutil.walk_packages) runs nothing
    sys.exit(main())
