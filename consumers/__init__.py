"""What moves events: the notification-log follower, the Kafka relay and consumer groups,
offsets and dead letters."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
LOG_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
"""How the ledger's processes write log lines on stderr (the CLI and its decoder
processes alike): each with its time and level."""
