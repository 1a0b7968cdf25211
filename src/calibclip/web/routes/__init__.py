"""The app's routes, one `APIRouter` per area (pages, index metadata, search, images, explanations)."""

from calibclip.web.routes import api_meta, api_search, explain, images, pages

ROUTERS = (pages.router, api_meta.router, api_search.router, images.router, explain.router)

__all__ = ["ROUTERS"]
