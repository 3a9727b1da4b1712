"""The `ddnngen` command line: one module per area, each registering its commands on the group."""
