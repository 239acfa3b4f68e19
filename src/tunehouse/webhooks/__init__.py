"""Webhooks: OpenAI's fine-tuning job events, signed with Standard Webhooks, sent from a durable outbox."""
