"""The one data pipeline: formats, dataset registrations, loading, the prompt template, tokenization."""
