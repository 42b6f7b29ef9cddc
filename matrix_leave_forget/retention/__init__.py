"""Room retention: the state of each room, the sweeper and the purge pacer."""
