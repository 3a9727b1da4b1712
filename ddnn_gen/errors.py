"""Exceptions a user can act on. The CLI turns them into one-line messages."""


class DdnnError(Exception):
    """Base class: a problem with the user's input, not a bug in ddnngen."""


class DatasetError(DdnnError):
    """A dataset file is missing, truncated or malformed."""


class SpecError(DdnnError):
    """A model spec is invalid."""


class ModelFileError(DdnnError):
    """A model file is unreadable, lacks a spec or fails its content hash."""


class CompileError(DdnnError):
    """The device part cannot be compiled for the requested target."""


class OpenCLError(DdnnError):
    """No usable OpenCL platform/device, or the generated kernels failed to build or run."""
