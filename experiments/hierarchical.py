"""Hierarchical FL (HierFAVG, Liu et al. 2020): clients -> edge servers -> cloud, any algorithm.

    python experiments/hierarchical.py --groups 4 --num-clients 32 --edge-rounds 2
    python experiments/hierarchical.py --algorithm fedprox --mu 0.01 --compressor qsgd --json r.json

Flags: ``python experiments/hierarchical.py --help``; the logic lives in
fedjax_lab/experiments_lib/hierarchical.py.
"""

import sys

from fedjax_lab.experiments_lib.hierarchical import main

if __name__ == "__main__":
    sys.exit(main())
