"""pycontainerd-greeter: an example third-party pycontainerd plugin.

It serves `greeter.v1.Greeter` (proto/greeter/v1/greeter.proto) on the daemon's gRPC socket as
plugin `io.containerd.grpc.v1.greeter`. The pieces, one module each:

- service.py  the business logic in plain Python (no gRPC): greet, count, persist the counts;
- server.py   the thin gRPC adapter from the generated `GreeterBase` to that service;
- plugin.py   the config dataclass, the init/close coroutines and the `pycontainerd_register`
              hook the daemon finds through the `pycontainerd.plugins` entry point;
- gen/        the betterproto module generated from proto/ by generate.py (committed).
"""
from .plugin import GreeterConfig

__all__ = ["GreeterConfig"]
