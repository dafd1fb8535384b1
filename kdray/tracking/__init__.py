"""MLflow: the sweep's single writer, the champion's registration and export, and queries."""
