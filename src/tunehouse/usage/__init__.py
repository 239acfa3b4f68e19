"""Usage and cost: prices, metering records, quotas and rate limits (no FastAPI imports here)."""
