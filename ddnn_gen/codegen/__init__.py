"""Code generation: the device program rendered as C or OpenCL projects, the toolchain that builds them."""
