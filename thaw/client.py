"""The one way thaw's processes and commands connect to Temporal."""

from __future__ import annotations

import re
from datetime import timedelta

from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from .config import Config
from .errors import first_line


class TemporalUnreachable(RuntimeError):
    """No Temporal frontend answered at the configured address, or it has no such namespace."""


async def connect(cfg: Config) -> Client:
    """A client of the configured frontend and namespace. A namespace the server lacks fails here, in one line:
    else every call would, and a lookup's "not found" would read as "no such workflow" (an ended pool)."""
    try:
        client = await Client.connect(cfg.temporal_address, namespace=cfg.temporal_namespace)
    except RuntimeError as e:  # the SDK's "Failed client connect: ..."
        raise TemporalUnreachable(f"cannot reach Temporal at {cfg.temporal_address} (`thaw up` starts one; "
                                  f"THAW_TEMPORAL_ADDRESS / --temporal-address): {_why(e)}") from None
    try:
        await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=cfg.temporal_namespace),
                                                         retry=True, timeout=timedelta(seconds=10))
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise TemporalUnreachable(f"Temporal at {cfg.temporal_address} has no namespace "
                                      f"{cfg.temporal_namespace!r} (THAW_TEMPORAL_NAMESPACE; `temporal operator "
                                      f"namespace create` makes one)") from None
        if e.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED):
            raise TemporalUnreachable(f"Temporal at {cfg.temporal_address} did not answer: {e.message}") from None
        # else (a server that does not let this client describe namespaces, say): the calls themselves will tell
    return client


def _why(e: RuntimeError) -> str:
    """The words the SDK's transport error quotes ("Connection refused", a DNS failure's), else its first line."""
    m = re.search(r'(?:message|error): "([^"]+)"', str(e))
    return m[1] if m else first_line(e)
