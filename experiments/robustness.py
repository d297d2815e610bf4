"""Robustness grid: attack x defense x malicious fraction on digits and synthetic data.

    python experiments/robustness.py --config experiments/configs/robustness_grid.yaml
    python experiments/robustness.py --datasets digits --attacks backdoor --defenses mean,krum \
        --fractions 0.1,0.3 --rounds 5 --json runs/robustness.json
"""

import sys

from fedjax_lab.experiments_lib.robustness import main

if __name__ == "__main__":
    sys.exit(main())
