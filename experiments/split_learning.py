"""Split learning vs SplitFed vs FedAvg on digits (Gupta & Raskar 2018; Thapa et al. 2022).

    python experiments/split_learning.py --rounds 20 --json runs/split_learning.json
"""

import sys

from fedjax_lab.experiments_lib.split_learning import main

if __name__ == "__main__":
    sys.exit(main())
