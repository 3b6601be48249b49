"""Bridges that move records from other protocols into ingest (`ingest bridge ...`)."""
