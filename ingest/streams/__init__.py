"""Stream processing inside the appliance: processors from a source topic to a sink topic.

`ingest.streams` is also the API for custom processors: see `ingest.streams.api`.
"""

from ingest.streams.api import Batch, Output

__all__ = ["Batch", "Output"]
