"""The model zoo: architectures, datasets, training, and the Arrow store of network graphs."""
