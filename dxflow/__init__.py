"""dxflow: an agent on every node of an HPC job, one place on the login node to reach them."""

__version__ = "0.1.0"
API_VERSION = 1
