"""Running a device part from Python: NumPy, PyOpenCL, the generated C; sample files; simulated devices."""
