"""FedProx synthetic experiments (Li et al. 2020): FedAvg vs FedProx under 0/50/90 % stragglers.

    python experiments/fedprox_synthetic.py --quick --json runs/fedprox_quick.json
    python experiments/fedprox_synthetic.py --json runs/fedprox_synthetic.json
"""

import sys

from fedjax_lab.experiments_lib.fedprox_synthetic import main

if __name__ == "__main__":
    sys.exit(main())
