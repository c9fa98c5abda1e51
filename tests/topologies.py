"""Fixtures that run a module's tests on a Redis Cluster too (three masters
with a replica each, one for the whole run), imported by the modules that
want it:

* ``from .topologies import redis_topology``: each ``start_instance`` test
  twice, instances sharing one redis-server, then the Redis Cluster. A test
  that needs the standalone server itself (it stops it, kills its clients)
  says ``@STANDALONE_ONLY`` (``tests/conftest.py``);
* ``from .topologies import backend_name``: each ``herald``/``start_herald``
  test with the memory backend, one redis-server, and the Redis Cluster.
"""

from __future__ import annotations

import pytest


@pytest.fixture(params=["standalone", "cluster"])
def redis_topology(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)
