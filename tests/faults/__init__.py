"""Cluster fault tests with real processes: Redis stalls, partitions, failovers and slow instances."""
