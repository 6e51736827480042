"""Ray actor classes: the client shards and the coordinator. All pure logic lives in simfl."""
