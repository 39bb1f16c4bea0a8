"""Typed keys for what the aiohttp application holds."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from tokenrelay.relay import Relay

RELAY: web.AppKey[Relay] = web.AppKey("relay")
STARTED: web.AppKey[float] = web.AppKey("started", float)
BACKGROUND: web.AppKey[list[asyncio.Future[None]]] = web.AppKey("background")
