"""ZeroMQ job service over the engine. ``server`` (sockets, poll loop, dispatch),
``handlers`` (job requests), ``transfers`` (uploads, sources, downloads), ``pushes``
(watchers), ``lifecycle`` (the job lifecycle), ``kinds`` (job kinds as data),
``executors`` (local child processes or Ray actors), ``store`` (durable records),
``worker`` (the process that runs one job), ``cli`` (serve/keys/client)."""
