"""Integer folding of a trained device part (the device program) and its bitwise NumPy reference."""
