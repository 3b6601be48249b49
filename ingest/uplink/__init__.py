"""Uplink: forward local topics to a Kafka cluster (docs/UPLINK.md).

config.py ([[uplink]] tables), progress.py (sans-IO offsets per partition), shipper.py (one
uplink in one worker: reads logs, produces with confluent-kafka), task.py (the worker's
handle on all of them).
"""
