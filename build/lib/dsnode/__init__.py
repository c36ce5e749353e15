"""dsnode: a strongly consistent, partitioned, replicated key-value store."""

__version__ = "0.1.0"

__all__ = ["__version__", "Client", "SyncClient"]


def __getattr__(name: str):
    # Lazy so that `import dsnode` stays cheap for the CLI and the server.
    if name in ("Client", "SyncClient"):
        from dsnode.client import client as _client

        return getattr(_client, name)
    raise AttributeError(name)
