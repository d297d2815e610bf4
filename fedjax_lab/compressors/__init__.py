"""Update compressors: pure ``Compressor(init, encode, decode, bits, to_bytes, from_bytes)``.

See :mod:`fedjax_lab.compressors._base` for the contract and the non-finite policy, and
:mod:`fedjax_lab.compressors.testing` for the shared contract checker.

``random_bits(key, shape)`` / ``random_uniform(key, shape)`` are ``jax.random.bits(key, shape,
jnp.uint32)`` / ``jax.random.uniform(key, shape)`` bit for bit, with the threefry hash unrolled
(~5x faster on XLA:CPU, where JAX lowers it as a loop): the draws the default stochastic
rounding of :func:`qsgd` and :func:`terngrad` makes, for compressors written outside the package.
"""

# Registers the constructors by name for the experiment CLI (fedjax_lab.registry).
from fedjax_lab.compressors import _registered  # noqa: F401
from fedjax_lab.compressors._base import Compressor, TreeLayout
from fedjax_lab.compressors._threefry import bits as random_bits
from fedjax_lab.compressors._threefry import uniform as random_uniform
from fedjax_lab.compressors.error_feedback import ErrorFeedbackState, with_error_feedback
from fedjax_lab.compressors.identity import identity
from fedjax_lab.compressors.masked import masked
from fedjax_lab.compressors.per_leaf import per_leaf
from fedjax_lab.compressors.qsgd import qsgd
from fedjax_lab.compressors.sign import scaled_sign, sign
from fedjax_lab.compressors.sparsify import rand_k, top_k
from fedjax_lab.compressors.sstc import sstc
from fedjax_lab.compressors.stc import stc
from fedjax_lab.compressors.terngrad import terngrad

__all__ = [
    "Compressor",
    "ErrorFeedbackState",
    "TreeLayout",
    "identity",
    "masked",
    "per_leaf",
    "qsgd",
    "rand_k",
    "random_bits",
    "random_uniform",
    "scaled_sign",
    "sign",
    "sstc",
    "stc",
    "terngrad",
    "top_k",
    "with_error_feedback",
]
