"""Herald's benchmark: ``python -m tests.bench`` prints what it measures.

It reproduces the setup of ARCHITECTURE.md's performance targets on one machine: a private redis-server, two
Herald instances as separate processes, and load generator processes; a
visitor on instance A answers an agent on instance B. ``python -m
tests.bench.floods`` measures a bystander's round trips on one instance
under the CPU floods of SECURITY.md, with and without them. Nothing here is a
pytest test (no file is named ``test_*``): a timed assertion on a shared
2-core machine would be flaky, so the numbers are printed for a person to
read and compare.
"""
