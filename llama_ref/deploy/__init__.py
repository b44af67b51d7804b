"""Deployments beyond one process: `ray_serve` (the optional extra `[ray]`)."""
