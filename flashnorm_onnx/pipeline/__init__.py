"""The pipeline: optimize and inspect (api), one model's stages, folders, export, the report."""
