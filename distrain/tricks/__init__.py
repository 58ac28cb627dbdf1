"""Training tricks that hook into the loop at named points; each is a small module with its own test file."""
