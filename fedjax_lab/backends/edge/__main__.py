"""Command line of the edge backend: start the server or a client process by hand.

Server (trains; client processes connect to it)::

    python -m fedjax_lab.backends.edge server --listen 0.0.0.0:50051 --token-file secret \\
        [--tls-cert server.pem --tls-key server.key] -- --edge-clients 4 --rounds 50 ...

Client process ``k`` of ``--edge-clients`` (on each device/host)::

    python -m fedjax_lab.backends.edge client --server HOST:50051 --worker-id k \\
        --token-file secret [--tls-ca ca.pem] -- --edge-clients 4 --rounds 50 ...

Both sides take the experiment's flags after ``--`` (``experiments/fedavg.py`` flags by default;
``--problem module:function`` selects another problem factory on the client) and must be given
the same ones: the server refuses clients whose model/algorithm/data layout differ. The token
file holds a shared random secret (``python -c 'import secrets; print(secrets.token_hex(32))'``);
keep it private (mode 0600). Without TLS the token authenticates but does not encrypt.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEFAULT_PROBLEM = "fedjax_lab.experiment:edge_problem"


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _server(argv: Sequence[str]) -> int:
    from fedjax_lab.backends.edge import protocol
    from fedjax_lab.backends.edge.server import DEFAULT_MAX_MESSAGE_BYTES, EdgeBackend
    from fedjax_lab.experiment import (
        FedAvgConfig,
        parse_config,
        print_summary,
        run_fedavg_experiment,
    )
    from fedjax_lab.io.writers import write_json

    own, rest = _split(argv)
    parser = argparse.ArgumentParser(prog="python -m fedjax_lab.backends.edge server")
    parser.add_argument("--listen", default="127.0.0.1:50051",
                        help="host:port to bind (port 0: any free port, see --port-file)")
    parser.add_argument("--token-file", required=True, help="shared secret of the clients")
    parser.add_argument("--tls-cert", help="PEM certificate chain (serve over TLS)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--join-timeout", type=float, default=300.0,
                        help="seconds the first round waits for all client processes")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    parser.add_argument("--port-file", help="write the bound port here once listening")
    args = parser.parse_args(own)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("give both --tls-cert and --tls-key, or neither")
    try:
        cfg = parse_config(FedAvgConfig, [*rest, "--backend", "edge"], prog="edge server")
        token = protocol.load_token(args.token_file)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tls = (_read(args.tls_cert), _read(args.tls_key)) if args.tls_cert else None
    backend = EdgeBackend(
        num_workers=cfg.edge_clients, token=token, listen=args.listen,
        round_timeout=cfg.edge_round_timeout, join_timeout=args.join_timeout,
        max_message_bytes=args.max_message_bytes, tls=tls,
    )
    print(f"edge server listening on {backend.address}", file=sys.stderr, flush=True)
    if args.port_file:
        write_json(args.port_file, {"port": int(backend.address.rsplit(":", 1)[1])})
    try:
        summary = run_fedavg_experiment(cfg, backend=backend)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        backend.close()
    print_summary(summary, cfg.out)
    return 0


def _client(argv: Sequence[str]) -> int:
    own, rest = _split(argv)
    parser = argparse.ArgumentParser(prog="python -m fedjax_lab.backends.edge client")
    parser.add_argument("--server", required=True, help="host:port of the edge server")
    parser.add_argument("--worker-id", type=int, required=True,
                        help="this process's id in [0, --edge-clients)")
    parser.add_argument("--token-file", required=True, help="shared secret of the server")
    parser.add_argument("--tls-ca", help="PEM root certificate (connect over TLS)")
    parser.add_argument("--tls-server-name", help="expected name in the server certificate")
    parser.add_argument("--problem", default=DEFAULT_PROBLEM,
                        help="'package.module:function' building the EdgeProblem")
    parser.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--server-timeout", type=float, default=60.0,
                        help="give up after the server was unreachable this long (s)")
    parser.add_argument("--parent-pid", type=int,
                        help="exit when this process is no longer our parent")
    args = parser.parse_args(own)
    import jax

    jax.config.update("jax_platforms", "cpu")  # edge devices: CPU only
    from fedjax_lab.backends.edge import _common, protocol
    from fedjax_lab.backends.edge.client import run_client

    try:
        token = protocol.load_token(args.token_file)
        problem = _common.load_problem_factory(args.problem)(rest)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_client(
        problem, server=args.server, worker=args.worker_id, token=token,
        tls_ca=_read(args.tls_ca), server_name=args.tls_server_name,
        max_message_bytes=args.max_message_bytes, server_timeout=args.server_timeout,
        parent_pid=args.parent_pid,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("server", "client"):
        print("usage: python -m fedjax_lab.backends.edge {server|client} [flags] -- "
              "[experiment flags]", file=sys.stderr)
        return 2
    return _server(argv[1:]) if argv[0] == "server" else _client(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
