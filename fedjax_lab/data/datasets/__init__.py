"""Dataset loaders returning a common `Dataset`, and `federate` to split one into clients."""

from fedjax_lab.data.datasets._base import Dataset, federate
from fedjax_lab.data.datasets._registry import (
    DATASET_NAMES,
    H5_DATASETS,
    LAZY_DATASETS,
    NATURAL_TEST_DATASETS,
    TARGET_KIND_OF,
    load_dataset,
)
from fedjax_lab.data.datasets.cinic10 import (
    CINIC10_CLASSES,
    CINIC10_MEAN,
    CINIC10_STD,
    ImageFolderSplit,
    cinic10,
)
from fedjax_lab.data.datasets.digits import digits
from fedjax_lab.data.datasets.leaf import LEAF_TASKS, SHAKESPEARE_VOCAB, leaf
from fedjax_lab.data.datasets.stackoverflow import (
    UserSource,
    WordIds,
    bag_of_words,
    load_tag_vocab,
    load_word_vocab,
    stackoverflow_lr,
    stackoverflow_nwp,
    tag_targets,
)
from fedjax_lab.data.datasets.standin import STANDIN_DATASETS, write_standin
from fedjax_lab.data.datasets.synthetic import synthetic, synthetic_iid
from fedjax_lab.data.datasets.tfds_images import (
    LazyImageSplit,
    cifar10,
    cifar100,
    emnist,
    fashion_mnist,
    mnist,
)
from fedjax_lab.data.datasets.tff_h5 import (
    H5ClientSource,
    fed_cifar100,
    fed_emnist,
    fed_shakespeare,
    shakespeare_examples,
    shakespeare_tokens,
)

__all__ = [
    "CINIC10_CLASSES",
    "CINIC10_MEAN",
    "CINIC10_STD",
    "DATASET_NAMES",
    "H5_DATASETS",
    "LAZY_DATASETS",
    "LEAF_TASKS",
    "NATURAL_TEST_DATASETS",
    "SHAKESPEARE_VOCAB",
    "STANDIN_DATASETS",
    "TARGET_KIND_OF",
    "Dataset",
    "H5ClientSource",
    "ImageFolderSplit",
    "LazyImageSplit",
    "UserSource",
    "WordIds",
    "bag_of_words",
    "cifar10",
    "cifar100",
    "cinic10",
    "digits",
    "emnist",
    "fashion_mnist",
    "fed_cifar100",
    "fed_emnist",
    "fed_shakespeare",
    "federate",
    "leaf",
    "load_dataset",
    "load_tag_vocab",
    "load_word_vocab",
    "mnist",
    "shakespeare_examples",
    "shakespeare_tokens",
    "stackoverflow_lr",
    "stackoverflow_nwp",
    "synthetic",
    "synthetic_iid",
    "tag_targets",
    "write_standin",
]
