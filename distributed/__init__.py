"""Ray and MLflow plumbing shared by the pipelines."""
