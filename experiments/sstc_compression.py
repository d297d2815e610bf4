"""SSTC Table I (Mora et al. 2022): conv-layer compression of STC vs SSTC on the FEMNIST CNN.

    python experiments/sstc_compression.py --quick --json runs/sstc_quick.json
    python experiments/sstc_compression.py --json runs/sstc.json --out runs/sstc
"""

import sys

from fedjax_lab.experiments_lib.sstc import main

if __name__ == "__main__":
    sys.exit(main())
