"""tensorps-server: serve a shared-memory parameter store over gRPC."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from tensorps.server.app import StartupError, serve
from tensorps.server.config import ServerConfig

_DEFAULTS = ServerConfig()


def _env(name: str, default: object) -> object:
    return os.environ.get(f"TENSORPS_{name}", default)


def _size(text: str) -> int:
    """A byte count: 1048576, 64M, 16G (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tensorps-server",
        description="Serve named tensors with TensorFlow's Assign semantics over gRPC, stored in shared "
        "memory. Every flag has a TENSORPS_<FLAG> environment equivalent (e.g. TENSORPS_PORT).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default=_env("HOST", _DEFAULTS.host), help="address to listen on")
    p.add_argument("--port", type=int, default=_env("PORT", _DEFAULTS.port), help="port (0: any free port)")
    p.add_argument(
        "--workers",
        type=int,
        default=_env("WORKERS", os.cpu_count() or 1),
        help="server processes sharing the port and the store",
    )
    p.add_argument(
        "--store",
        default=_env("STORE", None),
        help="store directory on a tmpfs, shared by all servers naming it (default /dev/shm/tensorps-PORT)",
    )
    p.add_argument(
        "--keep-store",
        action="store_true",
        default=str(_env("KEEP_STORE", "")).lower() in ("1", "true", "yes"),
        help="leave the store's files in place at shutdown (otherwise the server that created it removes it)",
    )
    p.add_argument("--stripes", type=int, default=_env("STRIPES", _DEFAULTS.stripes), help="lock stripes")
    p.add_argument(
        "--max-variables",
        type=int,
        default=_env("MAX_VARIABLES", _DEFAULTS.max_variables),
        help="variable limit",
    )
    p.add_argument(
        "--max-total-bytes",
        type=_size,
        default=_env("MAX_TOTAL_BYTES", None),
        help="byte budget of the store (default: 90%% of the tmpfs's free space)",
    )
    p.add_argument(
        "--max-variable-bytes",
        type=_size,
        default=_env("MAX_VARIABLE_BYTES", None),
        help="largest variable in bytes (default: no limit but the total)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=_size,
        default=_env("MAX_MESSAGE_BYTES", _DEFAULTS.max_message_bytes),
        help="largest unary message; larger tensors are streamed",
    )
    p.add_argument(
        "--threads", type=int, default=_env("THREADS", _DEFAULTS.threads), help="threads per worker"
    )
    p.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=_env("MAX_CONCURRENT_RPCS", _DEFAULTS.max_concurrent_rpcs),
        help="calls in flight per worker before RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=_env("GRACE", _DEFAULTS.grace),
        help="seconds for in-flight calls at shutdown",
    )
    p.add_argument("--log-level", default=_env("LOG_LEVEL", _DEFAULTS.log_level), help="DEBUG, INFO, WARNING")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> ServerConfig:
    args = parser().parse_args(argv)
    max_total = args.max_total_bytes
    max_var = args.max_variable_bytes
    return ServerConfig(
        host=args.host,
        port=int(args.port),
        workers=max(1, int(args.workers)),
        store=args.store,
        keep_store=bool(args.keep_store),
        stripes=int(args.stripes),
        max_variables=int(args.max_variables),
        max_total_bytes=_size(max_total) if isinstance(max_total, str) else max_total,
        max_variable_bytes=_size(max_var) if isinstance(max_var, str) else max_var,
        max_message_bytes=_size(str(args.max_message_bytes)),
        threads=int(args.threads),
        max_concurrent_rpcs=int(args.max_concurrent_rpcs),
        grace=float(args.grace),
        log_level=str(args.log_level).upper(),
    )


def main(argv: Sequence[str] | None = None) -> None:
    config = config_from_args(argv)
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s tensorps[%(process)d] %(message)s",
        stream=sys.stderr,
    )
    try:
        code = serve(config)
    except StartupError as exc:
        print(f"tensorps-server: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
