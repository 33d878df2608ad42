"""Built-in tasks: a synthetic multi-hop QA world and the SFT warm start used by the quickstart."""
