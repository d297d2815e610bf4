"""Vertical FL on digits / FedProx synthetic: 1 (centralized) vs 2 vs 4 parties.

    python experiments/vertical_fl.py --parties 1,2,4 --json runs/vertical_fl.json
"""

import sys

from fedjax_lab.experiments_lib.vertical_fl import main

if __name__ == "__main__":
    sys.exit(main())
