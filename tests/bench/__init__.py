"""Herald's benchmark: ``python -m tests.bench`` prints what it measures.

It reproduces the setup of ARCHITECTURE.md's performance targets on one
machine: a private redis-server, two instances as separate processes, and
load generator processes; a visitor on instance A answers an agent on
instance B. Every figure is measured twice in the same run, for a ceiling
(``tests/bench/ceiling.py``, a bare aiohttp + Redis relay of the same round
trip) and for Herald, and printed with their ratio. The flood phases
(``tests/bench/floods.py``, also ``python -m tests.bench.floods`` alone)
measure a bystander's round trips on one instance with and without the
floods. Nothing here is a pytest test (no file is named ``test_*``): a timed
assertion on a shared 2-core machine would be flaky, so the numbers are
printed, with PASS/MISS against their targets, for a person to read.
"""
