"""Federated topologies beyond one server and one synchronous round.

Decentralized (gossip) learning: D-SGD, PushSum/SGP and CHOCO-SGD over one stacked node
pytree, with validated mixing matrices (:mod:`fedjax_lab.topologies.graphs`); hierarchical FL
(client -> edge -> cloud, HierFAVG); asynchronous buffered FL (FedBuff); split learning
(SplitFed) and vertical FL. Each topology is its own module(s) and runs the library's
algorithms, models and compressors; this package re-exports their public names. See
docs/design.md "Topologies".
"""

from fedjax_lab.topologies.choco import choco_sgd
from fedjax_lab.topologies.fedbuff import (
    STALENESS_WEIGHTS,
    ClientTimes,
    FedBuffResult,
    constant_staleness,
    polynomial_staleness,
    run_fedbuff,
    staleness_weight,
)
from fedjax_lab.topologies.gossip import dsgd
from fedjax_lab.topologies.gossip_run import DecentralizedResult, run_decentralized
from fedjax_lab.topologies.graphs import (
    TOPOLOGIES,
    Topology,
    check_mixing,
    directed,
    erdos_renyi,
    exponential,
    from_adjacency,
    from_matrices,
    fully_connected,
    metropolis_hastings,
    one_peer_exponential,
    ring,
    topology_by_name,
    torus,
    torus_shape,
)
from fedjax_lab.topologies.hierarchical import (
    HierarchicalResult,
    check_grouping,
    random_grouping,
    run_hierarchical,
)
from fedjax_lab.topologies.node_backends import sharded_round, vmap_round
from fedjax_lab.topologies.nodes import (
    NODE_METRICS,
    DecentralizedAlgorithm,
    GossipState,
    NodeComm,
    consensus_distance,
    dense_mix,
    node_average,
    replicate,
    sparse_mix,
    sparse_rows,
)
from fedjax_lab.topologies.pushsum import pushsum
from fedjax_lab.topologies.split import (
    Layer,
    SplitModel,
    SplitState,
    SplitTrainer,
    builtin_layers,
    init_state,
    split_grads,
    split_model,
    splitfed,
    vanilla_split_learning,
)
from fedjax_lab.topologies.vertical import (
    VerticalModel,
    check_feature_groups,
    epoch_batches,
    feature_split,
    split_features,
    vertical_grads,
    vertical_model,
    vertical_trainer,
)

__all__ = [
    "NODE_METRICS",
    "STALENESS_WEIGHTS",
    "TOPOLOGIES",
    "ClientTimes",
    "DecentralizedAlgorithm",
    "DecentralizedResult",
    "FedBuffResult",
    "GossipState",
    "HierarchicalResult",
    "Layer",
    "NodeComm",
    "SplitModel",
    "SplitState",
    "SplitTrainer",
    "Topology",
    "VerticalModel",
    "builtin_layers",
    "check_feature_groups",
    "check_grouping",
    "check_mixing",
    "choco_sgd",
    "consensus_distance",
    "constant_staleness",
    "dense_mix",
    "directed",
    "dsgd",
    "epoch_batches",
    "erdos_renyi",
    "exponential",
    "feature_split",
    "from_adjacency",
    "from_matrices",
    "fully_connected",
    "init_state",
    "metropolis_hastings",
    "node_average",
    "one_peer_exponential",
    "polynomial_staleness",
    "pushsum",
    "random_grouping",
    "replicate",
    "ring",
    "run_decentralized",
    "run_fedbuff",
    "run_hierarchical",
    "sharded_round",
    "sparse_mix",
    "sparse_rows",
    "split_features",
    "split_grads",
    "split_model",
    "splitfed",
    "staleness_weight",
    "topology_by_name",
    "torus",
    "torus_shape",
    "vanilla_split_learning",
    "vertical_grads",
    "vertical_model",
    "vertical_trainer",
    "vmap_round",
]
