"""Operating a running fleet: the load-driven threshold controller, telemetry, and the operator's view."""
