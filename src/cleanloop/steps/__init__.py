"""One module per CLI step; each exposes ``run(cfg)``. Only these read files, write files and talk to MLflow."""
