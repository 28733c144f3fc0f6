"""Command-line pipelines (`python pipelines/<name>.py`): thin layers over zoo and metanet."""
