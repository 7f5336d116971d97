"""The toy world: synthetic movie reviews, a gold sentiment reward and simulated annotators (see world.py)."""
