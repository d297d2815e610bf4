"""FedAvg learning-rate sweep on digits: every (client lr, server lr, seed) run in ONE program.

    python experiments/sweep.py --client-lrs geom:0.01:10:16 --seeds 4 --rounds 50

Writes <out>/results.csv (one row per run), summary.csv (mean/std over seeds), results.json and
heatmap.png (test accuracy over client lr x server lr, or x seed for one server lr).
"""

import sys

from fedjax_lab.sweep import main

if __name__ == "__main__":
    sys.exit(main())
