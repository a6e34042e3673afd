"""distinfer.common."""
