"""The one way thaw's processes and commands connect to Temporal."""

from __future__ import annotations

import re

from temporalio.client import Client

from .config import Config
from .errors import first_line


class TemporalUnreachable(RuntimeError):
    """No Temporal frontend answered at the configured address."""


async def connect(cfg: Config) -> Client:
    try:
        return await Client.connect(cfg.temporal_address, namespace=cfg.temporal_namespace)
    except RuntimeError as e:  # the SDK's "Failed client connect: ..."
        raise TemporalUnreachable(f"cannot reach Temporal at {cfg.temporal_address} (`thaw up` starts one; "
                                  f"THAW_TEMPORAL_ADDRESS / --temporal-address): {_why(e)}") from None


def _why(e: RuntimeError) -> str:
    """The words the SDK's transport error quotes ("Connection refused", a DNS failure's), else its first line."""
    m = re.search(r'(?:message|error): "([^"]+)"', str(e))
    return m[1] if m else first_line(e)
