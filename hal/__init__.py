"""Hardware layer: small interfaces the core depends on, with Raspberry Pi and simulated implementations."""
