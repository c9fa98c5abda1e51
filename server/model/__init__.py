"""The server's model: records, pure presence rules, every limit, every name.

Nothing here does I/O: the backends store these records and the core
services apply these rules.
"""
