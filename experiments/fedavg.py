"""FedAvg (McMahan et al. 2017) on a federated dataset; the README's `make run` job.

    python experiments/fedavg.py --dataset digits --rounds 60 --out runs/fedavg

A preset of `experiments/train.py` (every train.py flag works here): ``--algorithm fedopt``
with the sgd server optimizer at ``--server-lr 1`` (exactly FedAvg), output in runs/fedavg;
``--server-optimizer adam|yogi|adagrad|momentum`` with ``--server-lr`` runs FedOpt.
"""

import sys

from fedjax_lab.experiment import main, run_fedavg_experiment
from fedjax_lab.train import FedAvgConfig

if __name__ == "__main__":
    sys.exit(main(FedAvgConfig, run_fedavg_experiment, prog="fedavg.py"))
