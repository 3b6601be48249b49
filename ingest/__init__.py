"""ingest: a multiprocess IoT telemetry ingestion appliance storing Kafka's on-disk format."""

__version__ = "0.1.0"
__all__ = ["Consumer", "Producer", "__version__"]


def __getattr__(name: str):
    # Lazy: the client SDK loads numba kernels and ZeroMQ, which `import ingest` alone
    # (the CLI's argument parsing, the supervisor) should not pay for.
    if name == "Producer":
        from ingest.net.producer import Producer

        return Producer
    if name == "Consumer":
        from ingest.net.consumer import Consumer

        return Consumer
    raise AttributeError(f"module 'ingest' has no attribute {name!r}")
