"""The aiohttp edge: websocket endpoints, HTTP routes, auth, pages, health."""
