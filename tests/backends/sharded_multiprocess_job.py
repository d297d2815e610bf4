"""One process of the 2-process ``jax.distributed`` run of tests/backends/test_sharded.py.

    python sharded_multiprocess_job.py PROCESS_ID PORT OUT_DIR

Runs the same stateful, stochastic FedAvg as the test's vmap reference with a ShardedBackend
whose mesh spans the devices of both processes, and saves this process's view of the result.
"""

import os
import sys

import jax

process_id, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process_id)
jax.config.update("jax_numpy_rank_promotion", "raise")

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from fedjax_lab.algorithms.fedavg import fedavg  # noqa: E402
from fedjax_lab.backends.sharded import ShardedBackend  # noqa: E402
from fedjax_lab.compressors import qsgd, with_error_feedback  # noqa: E402
from fedjax_lab.runner import ClientStateStore, run  # noqa: E402
from tests.helpers import LinearModel, make_population  # noqa: E402

assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
model = LinearModel(dim=5, classes=3)
alg = fedavg(model, optax.sgd(0.3, momentum=0.5), batch_size=3, local_epochs=1,
             compressor=with_error_feedback(qsgd(num_levels=2)))
params = model.init(jax.random.key(0))
store = ClientStateStore(alg.client_init(params))
result = run(alg, ShardedBackend(plan="vmap"), make_population([4, 9, 2, 7, 5, 11, 3, 6], seed=2),
             params, rounds=3, clients_per_round=5, seed=0, client_store=store)
final = multihost_utils.process_allgather(result.server_state.params, tiled=True)
np.savez(os.path.join(out_dir, f"process{process_id}.npz"), w=final["w"], b=final["b"],
         train_loss=np.array([h["train_loss"] for h in result.history]),
         store_ids=np.array(sorted(store.states)))
