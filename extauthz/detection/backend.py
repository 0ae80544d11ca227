"""Which detection store the sidecar uses: the one its quota store says (Redis or this process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from extauthz.detection.memory import MemoryDetections
from extauthz.policy.build import Services
from extauthz.stores import store_for
from extauthz.stores.memory import MemoryStore

if TYPE_CHECKING:
    from extauthz.detection.redis import RedisDetections

__all__ = ["detections_for"]


def detections_for(services: Services) -> MemoryDetections | RedisDetections:
    """The sidecar's detection state: in Redis when ``--redis-url`` is set (shared by every replica),
    else in this process. One per process. Raises StoreConfigError like :func:`store_for`."""
    store = store_for(services)
    if isinstance(store, MemoryStore):
        def local() -> MemoryDetections:
            detections = MemoryDetections()
            store.on_clear.append(detections.clear)  # ``extauthz test`` empties both together
            return detections

        return services.shared(("detections", "memory"), local)
    from extauthz.detection.redis import RedisDetections
    from extauthz.stores.redis import RedisStore

    assert isinstance(store, RedisStore)
    return services.shared(("detections", "redis", id(store)), lambda: RedisDetections(store))
