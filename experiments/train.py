"""Any algorithm x compressor x aggregator on any dataset/model/backend, from flags or YAML.

    python experiments/train.py --algorithm fedprox --mu 0.01 --compressor qsgd --rounds 50
    python experiments/train.py --config experiments/configs/fedprox_synthetic.yaml

The choices and their hyperparameter flags come from the library's registries
(``python experiments/train.py --help`` lists them by component).
"""

import sys

from fedjax_lab.experiment import main, run_fedavg_experiment
from fedjax_lab.train import TrainConfig

if __name__ == "__main__":
    sys.exit(main(TrainConfig, run_fedavg_experiment, prog="train.py"))
