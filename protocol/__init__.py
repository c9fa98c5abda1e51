"""Herald's wire protocol: messages, codec, credentials and client SDKs.

Importable without the server: visitor SDKs, agent tools, tests and load
generators depend on this package alone.
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
