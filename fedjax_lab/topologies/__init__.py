"""Communication topologies beyond the star: decentralized (gossip) learning.

Decentralized FL (D-SGD, PushSum/SGP, CHOCO-SGD) keeps every node's model in one stacked
pytree (leading node axis); a gossip step is ``W @ params`` over that axis with a validated
mixing matrix from :mod:`fedjax_lab.topologies.graphs`. See docs/design.md "Topologies".
"""

from fedjax_lab.topologies.choco import choco_sgd
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

__all__ = [
    "NODE_METRICS",
    "TOPOLOGIES",
    "DecentralizedAlgorithm",
    "DecentralizedResult",
    "GossipState",
    "NodeComm",
    "Topology",
    "check_mixing",
    "choco_sgd",
    "consensus_distance",
    "dense_mix",
    "directed",
    "dsgd",
    "erdos_renyi",
    "exponential",
    "from_adjacency",
    "from_matrices",
    "fully_connected",
    "metropolis_hastings",
    "node_average",
    "one_peer_exponential",
    "pushsum",
    "replicate",
    "ring",
    "run_decentralized",
    "sharded_round",
    "sparse_mix",
    "sparse_rows",
    "topology_by_name",
    "torus",
    "torus_shape",
    "vmap_round",
]
