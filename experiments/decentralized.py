"""Decentralized (gossip) FL: D-SGD, PushSum/SGP or CHOCO-SGD on a graph of nodes.

    python experiments/decentralized.py --topology ring,torus,fully_connected --json runs/dec.json
"""

import sys

from fedjax_lab.experiments_lib.decentralized import main

if __name__ == "__main__":
    sys.exit(main())
