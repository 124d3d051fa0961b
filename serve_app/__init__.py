"""The HTTP layer: FastAPI routers over a Backend (prism_ray/backend/store_backend.py); `deployment.build_ingress`
serves them on Ray Serve."""

from prism_ray.backend.store_backend import Backend, StoreBackend
from prism_ray.config import ApiSettings
from serve_app.app import create_app

__all__ = ["ApiSettings", "Backend", "StoreBackend", "create_app"]
