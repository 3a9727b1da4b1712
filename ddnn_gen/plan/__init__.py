"""The planner: which tiers run on the device, the edge and the cloud, and at what thresholds."""
