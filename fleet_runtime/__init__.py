"""What the programs of this project share at run time: flags with environment defaults,
Dynamo's logging conventions, signal handling and one nats-py quirk. No library code depends on it."""
