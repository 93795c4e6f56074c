"""Side-by-side benchmark of tensorps against a naive gRPC dict server, Redis and (if installed) a
TensorFlow ps task, all on loopback. Run it with `python -m bench` (see `--help`); nothing here is a test.
"""
