"""The instance's services: connections, watchers, the inbox, presence,
signal routing, support sessions, short codes, group settings, and the hub
that wires them."""
