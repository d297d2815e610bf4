"""Command line of the edge backend: the server, a client process, and worker keys.

Server (trains; client processes connect to it)::

    python -m fedjax_lab.backends.edge server --listen 0.0.0.0:50051 --master-file secret \\
        [--tls-cert server.pem --tls-key server.key] -- --edge-clients 4 --rounds 50 ...

Worker ``k``'s key (derived from the master secret; give each device only its own)::

    python -m fedjax_lab.backends.edge keys --master-file secret --worker k --out worker_k.key

Client process ``k`` of ``--edge-clients`` (on each device/host)::

    python -m fedjax_lab.backends.edge client --server HOST:50051 --key-file worker_k.key \\
        [--tls-ca ca.pem] -- --edge-clients 4 --rounds 50 ...

Both sides take the experiment's flags after ``--`` (``experiments/fedavg.py`` flags by default;
``--problem module:function`` selects another problem factory on the client) and must be given
the same ones: the server refuses, at join, clients whose flags, compiled client program or
shapes differ, and says which. The master file holds a random secret (``python -c 'import
secrets; print(secrets.token_hex(32))'``) that only the server reads; a worker key lets a device
authenticate as that worker and nobody else. Keep both private (mode 0600). Without TLS the
MACs authenticate but do not encrypt. See docs/threat_model.md.

Bad flags exit with status 2 and one line naming the flag, before anything is compiled.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

from fedjax_lab.backends.edge import protocol

DEFAULT_PROBLEM = "fedjax_lab.train:fedavg_edge_problem"


class _BadFlag(ValueError):
    """A flag value that cannot work (the message names the flag)."""


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _read(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise _BadFlag(f"{flag}: cannot read {path!r}: {err.strerror or err}") from err


def _positive(value: float, flag: str) -> None:
    if not value > 0:
        raise _BadFlag(f"{flag} must be > 0, got {value}")


def _message_bytes(value: int) -> None:
    if value < protocol.SMALL_FRAME_BYTES:
        raise _BadFlag(
            f"--max-message-bytes must be >= {protocol.SMALL_FRAME_BYTES} (a header-only "
            f"message must fit), got {value}"
        )


def _check_listen(listen: str) -> None:
    """Binds ``host:port`` once with a plain socket, so a bad address fails here, clearly."""
    host, sep, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise _BadFlag(f"--listen must be host:port (port 0-65535), got {listen!r}")
    try:
        infos = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as err:
        raise _BadFlag(f"--listen {listen!r}: cannot bind: {err.strerror or err}") from err


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _server(argv: Sequence[str]) -> int:
    own, rest = _split(argv)
    parser = argparse.ArgumentParser(prog="python -m fedjax_lab.backends.edge server")
    parser.add_argument("--listen", default="127.0.0.1:50051",
                        help="host:port to bind (port 0: any free port, see --port-file)")
    parser.add_argument("--master-file", required=True,
                        help="the master secret (worker keys are derived from it)")
    parser.add_argument("--tls-cert", help="PEM certificate chain (serve over TLS)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--join-timeout", type=float, default=300.0,
                        help="seconds the first round waits for all client processes")
    parser.add_argument("--receive-timeout", type=float, default=60.0,
                        help="seconds a request may take to deliver its body")
    parser.add_argument("--max-message-bytes", type=int, default=protocol.DEFAULT_MAX_MESSAGE_BYTES)
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--secure-aggregation", action="store_true",
                        help="aggregate each round through SecAgg/SecAgg+ (Bonawitz et al. "
                        "2017; Bell et al. 2020): the server sees only masked uploads")
    parser.add_argument("--secagg-neighbours", type=int, default=None,
                        help="SecAgg+ neighbours k (even); default: SecAgg (all pairs)")
    parser.add_argument("--secagg-bits", type=int, default=48,
                        help="fixed-point ring Z_(2^bits) of the masked inputs")
    parser.add_argument("--secagg-frac-bits", type=int, default=24,
                        help="fixed-point fractional bits (resolution 2^-frac_bits)")
    parser.add_argument("--secagg-bound", type=float, default=1024.0,
                        help="largest |w_i u_i| and w_i a client may send (clients refuse more)")
    parser.add_argument("--secagg-stage-timeout", type=float, default=30.0,
                        help="seconds each of the 4 SecAgg stages waits for the clients")
    args = parser.parse_args(own)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("give both --tls-cert and --tls-key, or neither")
    try:  # everything that can be checked without JAX, before anything is built
        try:
            master = protocol.load_master(args.master_file)
        except ValueError as err:
            raise _BadFlag(f"--master-file: {err}") from err
        cert, key = _read(args.tls_cert, "--tls-cert"), _read(args.tls_key, "--tls-key")
        _positive(args.join_timeout, "--join-timeout")
        _positive(args.receive_timeout, "--receive-timeout")
        _message_bytes(args.max_message_bytes)
        _check_listen(args.listen)
        secure = _secure_aggregation(args)
    except _BadFlag as err:
        return _fail(err)

    from fedjax_lab.backends.edge.server import EdgeBackend
    from fedjax_lab.experiment import print_summary, problem_config, run_fedavg_experiment
    from fedjax_lab.io.writers import write_json
    from fedjax_lab.train import FedAvgConfig

    try:
        cfg = FedAvgConfig.parse([*rest, "--backend", "edge"], prog="edge server")
        if secure is not None:
            _check_secure_flags(cfg)
    except ValueError as err:
        return _fail(err)
    try:
        backend = EdgeBackend(
            num_workers=cfg.edge_clients, token=master, listen=args.listen,
            round_timeout=cfg.edge_round_timeout, join_timeout=args.join_timeout,
            max_message_bytes=args.max_message_bytes, tls=(cert, key) if cert else None,
            receive_timeout=args.receive_timeout, problem_config=problem_config(cfg),
            secure_aggregation=secure,
        )
    except OSError as err:  # e.g. the port was taken since the check
        return _fail(_BadFlag(f"--listen: {err}"))
    print(f"edge server listening on {backend.address}", file=sys.stderr, flush=True)
    if args.port_file:
        write_json(args.port_file, {"port": int(backend.address.rsplit(":", 1)[1])})
    try:
        summary = run_fedavg_experiment(cfg, backend=backend)
    except ValueError as err:
        return _fail(err)
    finally:
        backend.close()
    print_summary(summary, cfg.out)
    return 0


def _secure_aggregation(args: argparse.Namespace):
    """The server's ``SecureAggregation`` from its flags (None without --secure-aggregation)."""
    if not args.secure_aggregation:
        if args.secagg_neighbours is not None:
            raise _BadFlag("--secagg-neighbours needs --secure-aggregation")
        return None
    from fedjax_lab.backends.edge.secagg import SecureAggregation
    from fedjax_lab.secagg import FixedPoint

    fixed_point = FixedPoint(args.secagg_bits, args.secagg_frac_bits, args.secagg_bound)
    try:
        fixed_point.validate()
    except ValueError as err:  # names bits, frac_bits or bound
        raise _BadFlag(f"--secagg-bits/--secagg-frac-bits/--secagg-bound: {err}") from err
    _positive(args.secagg_stage_timeout, "--secagg-stage-timeout")
    try:
        return SecureAggregation(fixed_point, neighbours=args.secagg_neighbours,
                                 stage_timeout=args.secagg_stage_timeout).validate()
    except ValueError as err:
        raise _BadFlag(f"--secagg-neighbours: {err}") from err


def _check_secure_flags(cfg) -> None:
    """Secure aggregation sums dense weighted updates: refuse what it cannot protect.

    (Non-mean aggregators are already refused on the edge backend; algorithms with client
    extras or state are refused by ``EdgeBackend`` before the first round compiles.)
    """
    if cfg.compressor != "identity":
        raise ValueError(f"--secure-aggregation sums dense updates; --compressor {cfg.compressor} "
                         "would be decoded per client by the server: use --compressor identity")
    if cfg.clients_per_round < 2:
        raise ValueError("--secure-aggregation needs --clients-per-round >= 2 (one client's "
                         "sum is its update)")


def _client(argv: Sequence[str]) -> int:
    own, rest = _split(argv)
    parser = argparse.ArgumentParser(prog="python -m fedjax_lab.backends.edge client")
    parser.add_argument("--server", required=True, help="host:port of the edge server")
    parser.add_argument("--key-file", required=True,
                        help="this worker's key (written by the `keys` command)")
    parser.add_argument("--worker-id", type=int,
                        help="optional: must equal the worker id of --key-file")
    parser.add_argument("--tls-ca", help="PEM root certificate (connect over TLS)")
    parser.add_argument("--tls-server-name", help="expected name in the server certificate")
    parser.add_argument("--problem", default=DEFAULT_PROBLEM,
                        help="'package.module:function' building the EdgeProblem")
    parser.add_argument("--max-message-bytes", type=int, default=protocol.DEFAULT_MAX_MESSAGE_BYTES)
    parser.add_argument("--server-timeout", type=float, default=60.0,
                        help="give up after the server was unreachable this long (s)")
    parser.add_argument("--parent-pid", type=int,
                        help="exit when this process is no longer our parent")
    args = parser.parse_args(own)
    try:
        try:
            worker, key = protocol.load_worker_key(args.key_file)
        except ValueError as err:
            raise _BadFlag(f"--key-file: {err}") from err
        if args.worker_id is not None and args.worker_id != worker:
            raise _BadFlag(
                f"--worker-id {args.worker_id} differs from the worker id {worker} of "
                f"--key-file {args.key_file!r}; drop --worker-id or use worker "
                f"{args.worker_id}'s key file"
            )
        tls_ca = _read(args.tls_ca, "--tls-ca")
        _message_bytes(args.max_message_bytes)
        _positive(args.server_timeout, "--server-timeout")
    except _BadFlag as err:
        return _fail(err)
    import jax

    jax.config.update("jax_platforms", "cpu")  # edge devices: CPU only
    from fedjax_lab.backends.edge import _common
    from fedjax_lab.backends.edge.client import run_client

    try:
        problem = _common.load_problem_factory(args.problem)(rest)
    except ValueError as err:
        return _fail(err)
    return run_client(
        problem, server=args.server, worker=worker, key=key, tls_ca=tls_ca,
        server_name=args.tls_server_name, max_message_bytes=args.max_message_bytes,
        server_timeout=args.server_timeout, parent_pid=args.parent_pid,
    )


def _keys(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedjax_lab.backends.edge keys",
        description="Writes worker N's key file (mode 0600), derived from the master secret.",
    )
    parser.add_argument("--master-file", required=True, help="the server's master secret")
    parser.add_argument("--worker", type=int, required=True, help="the worker id")
    parser.add_argument("--out", required=True, help="the key file to write (must not exist)")
    args = parser.parse_args(argv)
    try:
        try:
            master = protocol.load_master(args.master_file)
        except ValueError as err:
            raise _BadFlag(f"--master-file: {err}") from err
        if not 0 <= args.worker < protocol.MAX_WORKERS:
            raise _BadFlag(f"--worker must be in [0, {protocol.MAX_WORKERS}), got {args.worker}")
        try:
            protocol.write_worker_key(args.out, master, args.worker)
        except OSError as err:
            raise _BadFlag(f"--out: cannot write {args.out!r}: {err.strerror or err}") from err
    except _BadFlag as err:
        return _fail(err)
    print(f"wrote worker {args.worker}'s key to {args.out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"server": _server, "client": _client, "keys": _keys}
    if not argv or argv[0] not in commands:
        print("usage: python -m fedjax_lab.backends.edge {server|client|keys} [flags] -- "
              "[experiment flags]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
