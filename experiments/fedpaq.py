"""FedPAQ Figure 1 (Reisizadeh et al. 2020): training loss vs simulated time, four panels.

    python experiments/fedpaq.py --quick --json runs/fedpaq_quick.json
    python experiments/fedpaq.py --json runs/fedpaq.json --out runs/fedpaq
"""

import sys

from fedjax_lab.experiments_lib.fedpaq import main

if __name__ == "__main__":
    sys.exit(main())
