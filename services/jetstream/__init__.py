"""The transport boundary: everything that speaks nats-py.

``connection.py``  connecting (servers, credentials, TLS), the connection behind a context
``topology.py``    streams, consumers and buckets, created or updated idempotently
``pull.py``        pulling from durable consumers, and reading a delivery's ack subject
``publish.py``     plain, deduplicated and conditional publishes; last message; delete
``kv.py``          key-value reads and compare-and-set
``errors.py``      nats-py's errors read once: away for a moment, not found, condition failed
"""
