"""distinfer.worker."""
