"""ddnngen: code generator and device SDK for distributed DNNs with early exits."""

__version__ = "0.1.0"
