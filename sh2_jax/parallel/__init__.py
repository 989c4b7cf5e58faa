"""Device meshes, logical-axis sharding rules and context parallelism."""
