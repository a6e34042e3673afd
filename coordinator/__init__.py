"""distinfer.coordinator."""
