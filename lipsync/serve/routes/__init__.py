"""The server's routes, one ``APIRouter`` per area (each behind the token dependency of
:mod:`lipsync.serve.auth`): ``page`` (/healthz, the web page), ``avatars`` (/v1/avatars),
``lipsync`` (/v1/lipsync), ``stream`` (the WebSocket /v1/stream) and ``live`` (/v1/sessions: WebRTC)."""
