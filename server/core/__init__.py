"""The instance's services: connections, watchers, presence, signal routing,
support sessions, short codes, group settings, owned background tasks."""
