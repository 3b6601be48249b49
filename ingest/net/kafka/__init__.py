"""Kafka's wire protocol (non-flexible versions): a sans-IO codec and its message schemas."""
