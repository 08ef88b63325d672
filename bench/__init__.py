"""crm-bridge's performance bench: `python -m bench` (see bench/README.md)."""
