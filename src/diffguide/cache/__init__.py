"""Step caches, one file each; importing this package registers them (kind "cache")."""

from .base import Cache, CacheState
from .deepcache import DeepCache
from .first_block import FirstBlockCache
from .magcache import MagCache
from .taylorseer import TaylorSeer
from .teacache import TeaCache

__all__ = [
    "Cache",
    "CacheState",
    "DeepCache",
    "FirstBlockCache",
    "MagCache",
    "TaylorSeer",
    "TeaCache",
]
