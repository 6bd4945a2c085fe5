"""The development and test tools: the fake provider (``fake/``), ``ridethrough bench``
(``bench.py``), the outage drill of ``ridethrough demo`` (``demo.py``), and local stacks
for ``ridethrough dev`` and the tests (``devstack.py``: an embedded nats-server;
``stack.py``: a whole fleet on one machine, ``ServiceProcess``). The product services
(worker, prober, replayer, operator commands) never import them at run time.
"""
