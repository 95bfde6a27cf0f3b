"""nagaya: build, share and run container images on shared compute servers, without root."""

__version__ = "0.1.0"
