"""FedBuff (Nguyen et al. 2022) vs synchronous FedAvg: accuracy against simulated time.

    python experiments/fedbuff.py --json runs/fedbuff.json --out runs/fedbuff
"""

import sys

from fedjax_lab.experiments_lib.fedbuff import main

if __name__ == "__main__":
    sys.exit(main())
