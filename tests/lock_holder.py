"""A same-host store user for lock tests: takes a variable's stripe and keeps it until it is killed.

lock_holder.py hold PATH NAME    take NAME's stripe, print "held", sleep
lock_holder.py fork PATH NAME    take NAME's stripe, fork a child that sleeps (a data loader, say),
                                 print "held CHILD_PID", sleep
"""

from __future__ import annotations

import os
import sys
import time

from tensorps.server.store import Store


def main() -> None:
    mode, path, name = sys.argv[1:4]
    store = Store.attach(path, wait=0.0)
    store.locks.acquire(store.locks.stripe(name), exclusive=True)
    if mode == "fork":
        record = store.commit_record()
        child = os.fork()
        if child == 0:
            # Let go of the test's pipe: only the parent reports.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            time.sleep(3600)
            os._exit(0)
        print(f"held {child} {record.name}", flush=True)
    else:
        print("held", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main()
