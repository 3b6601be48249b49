"""Replication to peer appliances, after Kafka's model (docs/REPLICATION.md).

- ``settings``: the ``[replication]`` config section.
- ``epochs``: the leader-epoch cache of one partition and its ``leader-epoch-checkpoint``.
- ``role``: the appliance's role and leader epoch on disk (``replication.json``).
- ``leader``: what a leader worker keeps per partition: follower offsets, the in-sync set,
  the high watermark; ``checkpoint``: that state on disk for a restarted leader worker.
- ``follower``: a follower worker's fetcher (one DEALER per leader worker, on the worker's
  event loop): epoch check, truncation, fetch, append.
- ``truncate``: cutting a closed partition directory back to an offset.
- ``peers``: the supervisor's view of its peers (their role and epoch, from METADATA).
- ``worker``: the hooks a worker calls, in one object.
"""
