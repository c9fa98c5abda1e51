"""What connects instances: small interfaces (``base``), the embedded
memory implementation and the Redis one. Never imports the core above."""
