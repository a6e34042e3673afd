"""distinfer.client."""
