"""A TensorFlow parameter-server task: `python -m bench.backends.tfps_server PORT`, serving until killed."""

from __future__ import annotations

import importlib
import sys


def main() -> None:
    port = int(sys.argv[1])
    tf = importlib.import_module("tensorflow")
    cluster = tf.train.ClusterSpec({"ps": [f"127.0.0.1:{port}"]})
    server = tf.distribute.Server(cluster, job_name="ps", task_index=0, protocol="grpc", start=True)
    print(f"tf ps ready: serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    server.join()


if __name__ == "__main__":
    main()
