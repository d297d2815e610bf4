"""Registers the algorithms and aggregators with ``fedjax_lab.registry`` (the CLI's choices).

Tags the CLI checks before building: ``plain_sgd`` (no client momentum), ``own_local_sgd``
(local SGD from ``client_lr`` inside the algorithm: no other client optimizer or weight
decay), ``fixed_local_steps``
(needs ``--local-steps``), ``noisy_aggregate`` (no aggregator replacement), ``raw_uploads``
(no compressor: clients clip against a per-round bound), ``additive``
(aggregators that every backend can reduce as partial sums).

Each builder only calls the public constructor with the CLI's values, so ``--algorithm X``
is exactly ``X(...)`` built in Python.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from fedjax_lab.algorithms.dp_adaptive_clip import dp_fedavg_adaptive
from fedjax_lab.algorithms.dp_fedavg import dp_fedavg
from fedjax_lab.algorithms.dp_ftrl import dp_ftrl
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.fednova import fednova
from fedjax_lab.algorithms.fedopt import (
    fedadagrad,
    fedadam,
    fedavgm,
    fedopt,
    fedyogi,
    reddi_adaptive,
)
from fedjax_lab.algorithms.fedpaq import fedpaq
from fedjax_lab.algorithms.fedprox import fedprox
from fedjax_lab.algorithms.ldp_fedavg import MECHANISMS, ldp_fedavg
from fedjax_lab.algorithms.robust import (
    bulyan,
    centered_clipping,
    geometric_median,
    krum,
    mean,
    median,
    multi_krum,
    trimmed_mean,
)
from fedjax_lab.algorithms.scaffold import scaffold
from fedjax_lab.registry import (
    ALGORITHMS,
    AlgorithmContext,
    Param,
    register_aggregator,
    register_algorithm,
)

SERVER_LR = Param("server_lr", float, 1.0, "server learning rate on the averaged update")
ADAPTIVE = (
    Param("server_lr", float, 0.01, "server learning rate on the averaged update"),
    Param("b1", float, 0.9, "server first-moment decay (Reddi et al. 2021)"),
    Param("b2", float, 0.99, "server second-moment decay (Reddi et al. 2021)"),
    Param("tau", float, 1e-3, "server adaptivity tau (Reddi et al. 2021)"),
)
SERVER_OPTIMIZER_NAMES = ("sgd", "momentum", "adam", "yogi", "adagrad")


def _server_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=0.9)
    return reddi_adaptive(name, lr)  # Reddi et al. 2021 Alg. 2 exactly


def _fedavg(ctx: AlgorithmContext, compressor: Any) -> Any:
    return fedavg(ctx.model, ctx.client_optimizer(), compressor=compressor, **ctx.local_work())


def _fedprox(ctx: AlgorithmContext, compressor: Any, mu: float) -> Any:
    return fedprox(ctx.model, ctx.client_optimizer(), mu=mu, compressor=compressor,
                   **ctx.local_work())


def _fedopt(ctx: AlgorithmContext, compressor: Any, server_optimizer: str,
            server_lr: float) -> Any:
    return fedopt(ctx.model, ctx.client_optimizer(), _server_optimizer(server_optimizer, server_lr),
                  compressor=compressor, **ctx.local_work())


def _adaptive(constructor: Any) -> Any:
    def build(ctx: AlgorithmContext, compressor: Any, server_lr: float, b1: float, b2: float,
              tau: float) -> Any:
        return constructor(ctx.model, ctx.client_optimizer(), server_lr=server_lr, b1=b1, b2=b2,
                           tau=tau, compressor=compressor, **ctx.local_work())

    return build


def _fedavgm(ctx: AlgorithmContext, compressor: Any, server_lr: float,
             server_momentum: float) -> Any:
    return fedavgm(ctx.model, ctx.client_optimizer(), server_lr=server_lr,
                   momentum=server_momentum, compressor=compressor, **ctx.local_work())


def _scaffold(ctx: AlgorithmContext, compressor: Any, server_lr: float) -> Any:
    return scaffold(ctx.model, ctx.client_lr, num_clients=ctx.num_clients, server_lr=server_lr,
                    compressor=compressor, **ctx.local_work())


def _fednova(ctx: AlgorithmContext, compressor: Any) -> Any:
    return fednova(ctx.model, ctx.client_lr, client_momentum=ctx.client_momentum,
                   compressor=compressor, **ctx.local_work())


def _fedpaq(ctx: AlgorithmContext, compressor: Any) -> Any:
    loss = {} if ctx.per_example_loss is None else {"per_example_loss": ctx.per_example_loss}
    return fedpaq(ctx.model, ctx.client_optimizer(), num_steps=ctx.local_steps,
                  batch_size=ctx.batch_size, compressor=compressor, **loss)


def _dp_fedavg(ctx: AlgorithmContext, compressor: Any, dp_clip_norm: float,
               noise_multiplier: float) -> Any:
    # The server's noise key is the run seed's key, as for the model init.
    return dp_fedavg(ctx.model, ctx.client_optimizer(), clip_norm=dp_clip_norm,
                     noise_multiplier=noise_multiplier, clients_per_round=ctx.clients_per_round,
                     key=jax.random.key(ctx.seed), compressor=compressor, **ctx.local_work())


def _dp_fedavg_adaptive(ctx: AlgorithmContext, compressor: Any, dp_clip_norm: float,
                        noise_multiplier: float, target_quantile: float, clip_lr: float,
                        clip_count_stddev: float | None) -> Any:
    # The "raw_uploads" tag makes TrainConfig.validate refuse every --compressor but identity
    # (and --error-feedback), so this is the identity compressor: the raw float32 upload it
    # stands for is what the algorithm sends (same bits, 32 per coordinate).
    del compressor
    work = ctx.local_work()
    return dp_fedavg_adaptive(
        ctx.model, ctx.client_optimizer(), initial_clip_norm=dp_clip_norm,
        noise_multiplier=noise_multiplier, clients_per_round=ctx.clients_per_round,
        key=jax.random.key(ctx.seed), target_quantile=target_quantile, clip_lr=clip_lr,
        clip_count_stddev=clip_count_stddev, **work)


def _ldp_fedavg(ctx: AlgorithmContext, compressor: Any, dp_clip_norm: float,
                noise_multiplier: float, ldp_mechanism: str) -> Any:
    return ldp_fedavg(ctx.model, ctx.client_optimizer(), clip_norm=dp_clip_norm,
                      noise_multiplier=noise_multiplier, mechanism=ldp_mechanism,
                      compressor=compressor, **ctx.local_work())


def _dp_ftrl(ctx: AlgorithmContext, compressor: Any, dp_clip_norm: float,
             noise_multiplier: float, server_lr: float, server_momentum: float) -> Any:
    # The tree's noise key is the run seed's key, as DP-FedAvg's.
    return dp_ftrl(ctx.model, ctx.client_optimizer(), clip_norm=dp_clip_norm,
                   noise_multiplier=noise_multiplier, clients_per_round=ctx.clients_per_round,
                   key=jax.random.key(ctx.seed), server_lr=server_lr, momentum=server_momentum,
                   compressor=compressor, **ctx.local_work())


register_algorithm("fedavg", _fedavg, description="FedAvg (McMahan et al. 2017)")
register_algorithm(
    "fedprox", _fedprox, description="FedProx: proximal local objective (Li et al. 2020)",
    params=(Param("mu", float, 0.01, "FedProx proximal weight mu (0: FedAvg)"),))
register_algorithm(
    "fedopt", _fedopt,
    description="FedOpt: a server optimizer on the averaged update (Reddi et al. 2021, Alg. 1)",
    params=(Param("server_optimizer", str, "sgd", "FedOpt server optimizer",
                  SERVER_OPTIMIZER_NAMES), SERVER_LR))
register_algorithm("fedadam", _adaptive(fedadam), params=ADAPTIVE,
                   description="FedAdam (Reddi et al. 2021, Alg. 2)")
register_algorithm("fedyogi", _adaptive(fedyogi), params=ADAPTIVE,
                   description="FedYogi (Reddi et al. 2021, Alg. 2)")
register_algorithm("fedadagrad", _adaptive(fedadagrad), params=ADAPTIVE,
                   description="FedAdagrad (Reddi et al. 2021, Alg. 2)")
register_algorithm(
    "fedavgm", _fedavgm, description="FedAvgM: server momentum (Hsu et al. 2019)",
    params=(SERVER_LR, Param("server_momentum", float, 0.9, "FedAvgM server momentum")))
register_algorithm(
    "scaffold", _scaffold, params=(SERVER_LR,), tags=("plain_sgd", "own_local_sgd"),
    description="SCAFFOLD: control variates, plain local SGD (Karimireddy et al. 2020)")
register_algorithm(
    "fednova", _fednova, tags=("own_local_sgd",),
    description="FedNova: normalized averaging of local SGD (Wang et al. 2020)")
register_algorithm(
    "fedpaq", _fedpaq, tags=("fixed_local_steps",),
    description="FedPAQ: --local-steps of SGD, unweighted mean (Reisizadeh et al. 2020)")
register_algorithm(
    "dp_fedavg", _dp_fedavg, tags=("noisy_aggregate",),
    description="DP-FedAvg: client clipping + Gaussian noise (McMahan et al. 2018)",
    params=(Param("dp_clip_norm", float, 1.0, "DP-FedAvg L2 bound S on each client's update"),
            Param("noise_multiplier", float, 1.0,
                  "DP-FedAvg noise multiplier z (noise std z*S on the sum)")))
DP_CLIP = Param("dp_clip_norm", float, 1.0, "DP-FedAvg L2 bound S on each client's update")
register_algorithm(
    "dp_fedavg_adaptive", _dp_fedavg_adaptive, tags=("noisy_aggregate", "raw_uploads"),
    description="DP-FedAvg with adaptive quantile clipping (Andrew et al. 2021, Alg. 1)",
    params=(Param("dp_clip_norm", float, 1.0,
                  "DP-FedAvg L2 bound S on each client's update (adaptive: its initial value)"),
            Param("noise_multiplier", float, 1.0,
                  "DP-FedAvg noise multiplier z (adaptive: of sum and count together)"),
            Param("target_quantile", float, 0.5,
                  "adaptive clipping: target fraction gamma of unclipped clients"),
            Param("clip_lr", float, 0.2, "adaptive clipping: geometric step eta_C"),
            Param("clip_count_stddev", float, None,
                  "adaptive clipping: noise std sigma_b on the unclipped count (none: "
                  "clients_per_round / 20); must exceed z / 2")))
register_algorithm(
    "ldp_fedavg", _ldp_fedavg, tags=("noisy_aggregate",),
    description="FedAvg with local DP: each client clips and noises its update (Gaussian "
                "or Laplace) before upload",
    params=(Param("dp_clip_norm", float, 1.0,
                  "L2 (gaussian) or L1 (laplace) bound C on each client's update"),
            Param("noise_multiplier", float, 1.0,
                  "noise std / Laplace scale per coordinate over C (local DP)"),
            Param("ldp_mechanism", str, "gaussian", "local DP noise", MECHANISMS)))
register_algorithm(
    "dp_ftrl", _dp_ftrl, tags=("noisy_aggregate",),
    description="DP-FTRL: tree-aggregation noise on the running sum, no sampling "
                "amplification (Kairouz et al. 2021, Alg. 1)",
    params=(DP_CLIP,
            Param("noise_multiplier", float, 1.0, "DP-FTRL noise multiplier z per tree node"),
            SERVER_LR,
            Param("server_momentum", float, 0.0, "DP-FTRLM momentum gamma in [0, 1)")))
# FedBN trains a model with BatchNorm state (apply(params, state, x, ...)) and is evaluated
# with each client's own BatchNorm layer, which lives in the client-state store: the CLI's
# --model choices and its evaluator (the server's parameters on the test set) provide neither,
# so a CLI "fedbn" run would report numbers of a model FedBN never uses.
ALGORITHMS.refuse(
    "fedbn", "FedBN needs a model with BatchNorm state and evaluation with each client's own "
    "BatchNorm layer, which --model and the CLI's server-side evaluation do not provide; build "
    "it in Python: fedjax_lab.algorithms.fedbn(fedjax_lab.models.BatchNormMLP(...), ...)")

register_aggregator("mean", lambda: mean(), tags=("additive",),
                    description="the algorithm's own weighted mean (additive)")
register_aggregator("median", lambda: median(),
                    description="coordinate-wise median (Yin et al. 2018)")
register_aggregator(
    "trimmed_mean", lambda trim_fraction: trimmed_mean(trim_fraction),
    description="coordinate-wise trimmed mean (Yin et al. 2018)",
    params=(Param("trim_fraction", float, 0.1, "fraction trimmed from each end, in [0, 0.5)"),))
register_aggregator(
    "krum", lambda byzantine_clients: krum(byzantine_clients),
    description="Krum (Blanchard et al. 2017)",
    params=(Param("byzantine_clients", int, 1, "Byzantine clients f tolerated by Krum"),))
register_aggregator(
    "multi_krum", lambda byzantine_clients, krum_keep: multi_krum(byzantine_clients, krum_keep),
    description="Multi-Krum: mean of the m best-scored updates (Blanchard et al. 2017)",
    params=(Param("byzantine_clients", int, 1, "Byzantine clients f tolerated by Krum"),
            Param("krum_keep", int, 2, "Multi-Krum: updates m averaged")))
register_aggregator(
    "bulyan", lambda byzantine_clients: bulyan(byzantine_clients),
    description="Bulyan: recursive Krum, then trimmed mean around the median "
                "(El Mhamdi et al. 2018); needs --clients-per-round >= 4f + 3",
    params=(Param("byzantine_clients", int, 1, "Byzantine clients f tolerated by Krum"),))
register_aggregator(
    "geometric_median",
    lambda geomed_iterations, geomed_nu, geomed_tol: geometric_median(
        geomed_iterations, geomed_nu, geomed_tol),
    description="RFA: smoothed-Weiszfeld geometric median (Pillutla et al. 2022)",
    params=(Param("geomed_iterations", int, 3, "RFA: fixed number of Weiszfeld steps R"),
            Param("geomed_nu", float, 1e-6, "RFA: smoothing nu > 0 of the distances"),
            Param("geomed_tol", float, 1e-5,
                  "RFA: last-step size under which geomed_converged reports 1")))
register_aggregator(
    "centered_clipping",
    lambda cclip_tau, cclip_iterations: centered_clipping(cclip_tau, cclip_iterations),
    description="centered clipping from the coordinate median (Karimireddy et al. 2021)",
    params=(Param("cclip_tau", float, 1.0, "centered clipping radius tau > 0"),
            Param("cclip_iterations", int, 1, "centered clipping iterations L >= 1")))
