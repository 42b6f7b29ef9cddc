"""Room retention: the state of each room, the store, the sweeper and the purge pacer."""
