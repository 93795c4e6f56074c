"""Persistence: point-in-time snapshots, a write-ahead log, and restore (README "Persistence").

    state.py     what every process of a server shares about persistence: the settings (data directory,
                 log mode) and a small shared-memory state (the log's generation, the last snapshot's
                 figures), both files in the store's directory
    layout.py    the data directory's names: snap-<generation>/ and wal-<generation>.log
    tensors.py   variables <-> safetensors tensors (dtypes, complex128 as float64 pairs)
    snapshot.py  the cut (every stripe held for a moment: active buffers pinned, a new log begun), then
                 the shards, the manifest, fsync, rename, pruning
    records.py   the log's record format: checksummed records of typed entries, extensible by kind
    journal.py   appending records (O_APPEND, under the variables' locks) and the fsync policy
    restore.py   a new store from the newest valid snapshot and the logs after it

Generations order everything: a snapshot taken while generation g-1 is written begins generation g (under
every stripe lock), so snapshot g holds every write before its cut and wal-g.log and later logs every write
after it. Restore = snapshot g + logs g, g+1, ... in order.
"""
