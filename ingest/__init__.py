"""ingest: a multiprocess IoT telemetry ingestion appliance storing Kafka's on-disk format."""

__version__ = "0.1.0"
