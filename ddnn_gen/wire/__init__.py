"""The wire: request/reply bytes, topics and ids, MQTT transport helpers, and the broker manager."""
