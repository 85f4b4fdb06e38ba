"""The router's scores (kept as an import path): the routers live in :mod:`paddle_semoe.moe.routers`.

``Router`` is the base linear router (token choice, the gate kinds topk / gshard / switch);
``make_router`` builds the router a config names.
"""

from __future__ import annotations

from paddle_semoe.moe.routers import ROUTERS, Router, RouterOutput, TokenChoiceRouter, make_router

__all__ = ["ROUTERS", "Router", "RouterOutput", "TokenChoiceRouter", "make_router"]
