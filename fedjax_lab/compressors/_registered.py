"""Registers the compressors with ``fedjax_lab.registry`` (the CLI's ``--compressor`` choices).

Tags: ``"unbiased"`` (E C(x) = x) or ``"biased"``; error feedback is the CLI's
``--error-feedback`` wrapper (:func:`with_error_feedback`), not a compressor.
"""

from __future__ import annotations

from fedjax_lab.compressors.identity import identity
from fedjax_lab.compressors.qsgd import qsgd
from fedjax_lab.compressors.sign import scaled_sign, sign
from fedjax_lab.compressors.sparsify import rand_k, top_k
from fedjax_lab.compressors.sstc import sstc
from fedjax_lab.compressors.stc import stc
from fedjax_lab.compressors.terngrad import terngrad
from fedjax_lab.registry import Param, register_compressor

SPARSITY = Param("sparsity", float, 0.01, "fraction of the coordinates kept, in (0, 1]")
ROUNDING_BITS = Param(
    "rounding_bits", str, None, "each coordinate's stochastic-rounding draw: 8 or 16 (a k-bit "
    "uniform: less threefry work, exact marginals, correlation <= 1/(2^k - 1) within 16 "
    "coordinates), hash (a bijective hash of the index and 64 key bits: exact marginals, no "
    "independence claim within one vector) or none (one float32 threefry uniform)",
    choices=("8", "16", "hash"))


def _rounding(value: str | None) -> int | str | None:
    """The compressors' ``rounding_bits`` from the CLI's string choice."""
    return value if value in (None, "hash") else int(value)


register_compressor("identity", identity, tags=("unbiased",),
                    description="no compression: 32 bits per coordinate")
register_compressor(
    "qsgd", lambda num_levels, bucket_size, rounding_bits: qsgd(
        num_levels, bucket_size, rounding_bits=_rounding(rounding_bits)),
    tags=("unbiased",), description="QSGD stochastic quantization "
    "(Alistarh et al. 2017; FedPAQ's quantizer)",
    params=(Param("num_levels", int, 4, "QSGD quantization levels s"),
            Param("bucket_size", int, None, "QSGD bucket size (none: one bucket)"),
            ROUNDING_BITS))
register_compressor("rand_k", lambda sparsity: rand_k(sparsity), params=(SPARSITY,),
                    tags=("unbiased",), description="random-k sparsification, rescaled by d/k "
                    "(Stich et al. 2018)")
register_compressor("top_k", lambda sparsity: top_k(sparsity), params=(SPARSITY,),
                    tags=("biased",), description="top-k sparsification (Aji & Heafield 2017)")
register_compressor("sign", sign, tags=("biased",),
                    description="signSGD: one bit per coordinate (Bernstein et al. 2018)")
register_compressor("scaled_sign", scaled_sign, tags=("biased",),
                    description="sign scaled by the mean |x| (Karimireddy et al. 2019)")
register_compressor(
    "terngrad", lambda clip_sigmas, rounding_bits: terngrad(
        clip_sigmas, rounding_bits=_rounding(rounding_bits)),
    tags=("unbiased",),
    description="TernGrad ternary quantization (Wen et al. 2017)",
    params=(Param("clip_sigmas", float, None,
                  "TernGrad clipping at c standard deviations (none: unclipped, unbiased)"),
            ROUNDING_BITS))
register_compressor("stc", stc, params=(SPARSITY,), tags=("biased",),
                    description="sparse ternary compression (Sattler et al. 2019)")
register_compressor(
    "sstc", sstc, tags=("biased",),
    description="structured sparse ternary compression of conv kernels (Mora et al. 2022)",
    params=(SPARSITY, Param("kernel_fraction", float, 0.1,
                            "SSTC fraction of the conv kernels kept, in (0, 1]")))
