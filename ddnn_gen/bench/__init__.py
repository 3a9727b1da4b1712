"""Whole-system measurements: the demo, `ddnngen bench` (paper Tables II-IV) and the bench scripts' shared code."""
