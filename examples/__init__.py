"""Runnable examples: a demo (`make run`), an asynchronous SGD training job and a health check.

python -m tensorps.examples.demo          start a server, show a few calls, train, stop the server
python -m tensorps.examples.train         asynchronous SGD workers against a running server
python -m tensorps.examples.basics        a few plain create/assign/read calls, printed
python -m tensorps.examples.healthcheck   exit 0 if a server answers SERVING (Docker's HEALTHCHECK)
"""
