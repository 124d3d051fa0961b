"""The HTTP layer (DESIGN §3): FastAPI routes over a Backend; `deployment.build_ingress` serves them on Ray."""

from serve_app.app import create_app
from serve_app.backend import Backend, StoreBackend
from serve_app.models import ApiSettings

__all__ = ["ApiSettings", "Backend", "StoreBackend", "create_app"]
