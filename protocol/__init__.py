"""Herald's wire protocol: messages, their checks, the msgpack codec, error
and close codes, and signed credentials.

Pure: no sockets, no server, no network library. The SDKs on top of it are
in ``herald_presence.protocol.client``; visitor apps, agent tools, tests and
load generators depend on these two alone.
"""

from .errors import CloseCode, ErrorCode, HeraldError, ProtocolError, RequestFailed, should_reconnect
from .messages import PROTOCOL_VERSION, SUPPORTED_VERSIONS, ConnectionState, Message, VisitorState

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "CloseCode",
    "ConnectionState",
    "ErrorCode",
    "HeraldError",
    "Message",
    "ProtocolError",
    "RequestFailed",
    "VisitorState",
    "should_reconnect",
]
