"""The per-node shared-memory broker and its client library.

The daemon (`python -m shmbroker`) owns memory as a few large slabs per device and per pool
and lends buffers out of them under leases; processes pass `TensorRef`s (a slab id, an offset,
a size, a type, a shape, a lease and a signature) and view the bytes in place.

    allocator.py  best-fit coalescing free list inside one slab (no I/O)
    slabs.py      slab memory (POSIX shm or CUDA IPC), per-pool groups, cap, quarantine
    leases.py     lease table: TTL, owner-process liveness, ended-lease memory
    refs.py       HMAC tags on refs
    keys.py       the ref key's own Unix socket: served to peers the kernel says are trusted
    broker.py     the domain object tying them together, the sweeper and statistics
    servicer.py   gRPC adapter;  server.py: create_server / serve;  settings.py; __main__.py
    mapping.py    client side: open a slab once per process, views with no copy
    client.py     BrokerClient, used by stages and the gateway
    hop.py        a one-method stage process used by the benchmark and the tests
    harness.py    start broker / hop processes and wait for SERVING
    bench.py      `python -m shmbroker.bench`: one hop, ref against host copy
"""
