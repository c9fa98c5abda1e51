"""Keeping a visitor's state from ``presence_changed`` frames: what both
SDKs (and any client) do with a ``delta``."""

from __future__ import annotations

from .messages import ConnectionState, VisitorDelta, VisitorState


def apply_delta(state: VisitorState | None, delta: VisitorDelta) -> VisitorState | None:
    """The state ``delta`` leads to from ``state``; None when ``state`` is
    not the version the delta applies to (a change was missed: look the
    visitor up). ``state`` is left as it was."""
    if state is None or state["version"] != delta["base"]:
        return None
    connections: dict[str, ConnectionState] = {c["connection"]: c for c in state["connections"]}
    for gone in delta["removed"]:
        connections.pop(gone, None)
    for change in delta["changed"]:
        held = connections.get(change["connection"])
        data = dict(held["data"]) if held else {}
        data.update(change.get("data", {}))
        connections[change["connection"]] = {
            "connection": change["connection"],
            "data": {key: value for key, value in data.items() if value is not None},
            "visible": change.get("visible", held["visible"] if held else False),
            "focused": False,
            "since": change.get("since", held["since"] if held else 0.0),
        }
    focused = delta["focused"]
    return {
        "visitor": state["visitor"],
        "online": True,
        "version": delta["version"],
        "connections": [{**c, "focused": c["connection"] == focused} for c in connections.values()],
    }
