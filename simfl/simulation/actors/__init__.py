"""Ray actor classes: the client shards, the coordinator and the attackers. Their logic lives in simfl.engine."""
