"""Herald's aiohttp server: endpoints, routing hub, auth, config, backends."""

__version__ = "0.1.0"
