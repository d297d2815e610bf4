"""FedAvg (McMahan et al. 2017) on a federated dataset; the README's `make run` job.

    python experiments/fedavg.py --dataset digits --rounds 60 --out runs/fedavg
"""

import sys

from fedjax_lab.experiment import FedAvgConfig, main, run_fedavg_experiment

if __name__ == "__main__":
    sys.exit(main(FedAvgConfig, run_fedavg_experiment, prog="fedavg.py"))
