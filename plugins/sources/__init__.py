"""Input formats that ``python -m core.shards`` turns into WebDataset shards (kind ``source``)."""
