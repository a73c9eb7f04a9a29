"""ZeroMQ job service over the engine: ``server`` (ROUTER, queue, durable store),
``worker`` (the child process that runs a job), ``cli`` (serve/keys/client)."""
