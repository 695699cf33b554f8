"""The one way thaw's processes and commands connect to Temporal."""

from __future__ import annotations

from temporalio.client import Client

from .config import Config


class TemporalUnreachable(RuntimeError):
    """No Temporal frontend answered at the configured address."""


async def connect(cfg: Config) -> Client:
    try:
        return await Client.connect(cfg.temporal_address, namespace=cfg.temporal_namespace)
    except RuntimeError as e:  # the SDK's "Failed client connect: ..."
        raise TemporalUnreachable(f"cannot reach Temporal at {cfg.temporal_address} (`thaw up` starts one; "
                                  f"THAW_TEMPORAL_ADDRESS / --temporal-address): {e}") from None
