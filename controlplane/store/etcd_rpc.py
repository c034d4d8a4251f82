"""gRPC and the python ``etcd3`` client (0.12), imported where an etcd client is made: ``load()``.

Until ``load()`` runs, ``grpc``, ``etcdrpc``, ``kv_pb2`` and ``Client`` are None; the etcd store
calls it when it is created, and every use comes after that.

Why not a plain import at the top: gRPC's C core logs TLS and connection failures straight to
stderr, several lines each (``E1129 ... ssl_transport_security.cc ...``), and in weftd's log those
would stand beside the one-line error the store reports for the same failure. The core reads
``GRPC_VERBOSITY`` once, when ``grpc`` is first imported (setting it afterwards changes nothing:
measured with grpcio 1.85), so it must be set right before that import. Doing it here, and not
when a module is imported, confines it to processes that make an etcd client. A GRPC_VERBOSITY
the user set wins.
"""
from __future__ import annotations

import os

from .base import StoreError

PROTOBUF_HINT = "etcd store needs the etcd3 client with protobuf<4 (pip install 'protobuf==3.20.3')"

grpc = None
etcd3 = None
etcdrpc = None
kv_pb2 = None
Client = None


def load() -> None:
    """Import gRPC and the etcd3 client once; StoreError (one line) when they cannot be."""
    global grpc, etcd3, etcdrpc, kv_pb2, Client
    if Client is not None:
        return
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        import grpc as grpc_
        import etcd3 as etcd3_
        from etcd3 import etcdrpc as etcdrpc_
        from etcd3.etcdrpc import kv_pb2 as kv_pb2_
    except Exception as exc:  # protobuf>=4: TypeError "Descriptors cannot be created directly"
        raise import_error(exc) from None

    class _Client(etcd3_.Etcd3Client):
        """etcd3's client; ``ca_cert=""`` means TLS with the system's trusted roots."""

        def _get_secure_creds(self, ca_cert, cert_key=None, cert_cert=None):
            def read(path):
                if not path:
                    return None
                with open(path, "rb") as f:
                    return f.read()
            return grpc_.ssl_channel_credentials(read(ca_cert), read(cert_key), read(cert_cert))

    grpc, etcd3, etcdrpc, kv_pb2, Client = grpc_, etcd3_, etcdrpc_, kv_pb2_, _Client


def import_error(exc: BaseException) -> StoreError:
    """The one line for a client that does not import."""
    if isinstance(exc, ModuleNotFoundError) and exc.name in ("etcd3", "grpc"):
        return StoreError(f"etcd store needs the etcd3 client ({exc.name} is not"
                          " installed: pip install etcd3 'protobuf==3.20.3')")
    return StoreError(PROTOBUF_HINT)


def unavailable_reason() -> str | None:
    """Why no etcd client can be made here (for a test's skip), or None."""
    try:
        load()
    except StoreError as exc:
        return str(exc)
    return None
