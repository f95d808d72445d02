"""H200 speed table, dense vs CMoE (issue 3). The code lives in ``cmoe.bench`` so that
``cmoe bench`` runs the same thing:

    python benchmarks/bench_speed.py --help
"""

import sys

from cmoe.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
