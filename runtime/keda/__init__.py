"""A KEDA external scaler (gRPC, KEDA's externalscaler.proto) backed by thaw's demand: see scaler.py."""

from .scaler import Demand, DemandSource, ExternalScaler, UnknownDeployment, serve

__all__ = ["Demand", "DemandSource", "ExternalScaler", "UnknownDeployment", "serve"]
