"""svmmd, the VM launcher service (see server.py)."""
